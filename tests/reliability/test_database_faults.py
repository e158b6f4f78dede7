"""The state database misbehaves; mail is neither lost nor processed twice (issue #5: D1, D2, D4).

Every scenario runs the example mailing-list deployment of the integration
rig -- a real ``lamsonfilter milter`` or ``lamsonfilter smtpproxy``
process behind a real private Postfix, mail captured at a `CaptureServer`
-- against a real database: the app's SQLite file, or a private
PostgreSQL cluster this module starts (tests/rig/pgcluster.py), so that it
can be stopped by its PID without disturbing anybody else's server.
Mail is injected and counted with tests/rig/accounting.py.

======================  ======================================================================
scenario                what it proves
======================  ======================================================================
D2 (both modes)         PostgreSQL down (``pg_ctl stop -m immediate`` in content-filter mode,
                        SIGKILL of the postmaster in milter mode): every subscribe is
                        deferred -- content filter: queued by Postfix, ``451 4.3.0`` from the
                        filter, still in the queue, no bounce; milter: the client gets a 4xx
                        and Postfix queues nothing; so it stays for 3 attempts, more than the
                        content filter's poison-message limit (set to 2 here: a database
                        outage must not count).  PostgreSQL started, queue flushed (or the
                        client resends): exactly 1 state transition per subscriber (the
                        state row's version counter is 1) and exactly 1 confirmation each.
locked SQLite (both)    another connection holds ``BEGIN EXCLUSIVE`` on the app's database
                        while mail arrives: the filter waits its busy timeout (30 s), then
                        defers -- nothing delivered, nothing lost, the filter still running;
                        released: each message processed once, one confirmation each.
D1 (both modes, both    two messages for one FSM key at the same time; the first handler
back ends)              run stops between reading the state and writing it (a gate file)
                        until the second message waits for the key's lock (PostgreSQL:
                        seen in pg_locks; SQLite shows no waiters: 3 s after the second was
                        handed to Postfix) -- the second must not have read the state by
                        then; released: the final counter is 2 (the serial result) and the
                        second run read the first one's write.
D4 (both modes, both    20 parallel first messages for one new key: 1 state row, the counter
back ends)              is 20, every read value 0..19 seen once, all 20 delivered once.
======================  ======================================================================

An unreadable database file (``chmod 000``) is not tested: the filter runs
as root here (the private Postfix needs root), and root ignores file
permission bits (CAP_DAC_OVERRIDE), so the file stays readable and the
case cannot happen in this rig; the exclusive lock is the fault used.

Counts for the docs come from `account(..., scenario=...)`
(``LF_RELIABILITY_FIGURES=/path/figures.jsonl``).  Run::

    .venv/bin/python -m pytest -q tests/reliability/test_database_faults.py

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.rig.accounting import (
    Accounting,
    Injected,
    Injector,
    account,
    seqs_in_header,
)
from tests.rig.deploy import LIST_HOST
from tests.rig.deploy_milter import MilterDeployment, require_pymilter
from tests.rig.deploy_smtpproxy import SmtpproxyDeployment
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.pgcluster import PgCluster, pgcluster, require_pg  # noqa: F401 -- pgcluster: fixture
from tests.rig.postfix import wait_for

pytestmark = [pytest.mark.postfix]

SUBSCRIBE = f"python-subscribe@{LIST_HOST}"
CONFIRM_SUBJECT = "Confirm your subscription"
#: How many subscribers each outage scenario has (small: CI time).
SUBSCRIBERS = 3
#: D4: parallel first messages for one new key.
PARALLEL_FIRST = 20
MODES = ["smtpproxy", "milter"]
#: The content filter quarantines a message after this many crashed attempts (R15,
#: lamsonfilter.daemon.poison); a database outage must never count as one ...
POISON_LIMIT = 2
#: ... so D2 keeps the database down for more attempts than that.
OUTAGE_ATTEMPTS = 3



# --------------------------------------------------------------------------- the deployments


class _StateDatabase:
    """Mixin for a `Deployment`: the ``lfdb`` handler, a journal, and the app's DATABASE_URL.

    `database_url` None keeps the example's SQLite file (APP/var/state.db).
    """

    extra_handlers = ("lfdb",)  # tests/fixtures/handlers/lfdb.py
    extra_settings = f"POISON_LIMIT = {POISON_LIMIT}\n"

    database_url: str | None
    workdir: Path
    app_dir: Path
    app_settings: str
    filter_env: dict[str, str]

    def _setup_state_database(self, database_url: str | None) -> None:
        self.database_url = database_url
        if database_url is not None:
            self.app_settings += f"DATABASE_URL = {database_url!r}\n"
        self.journal = self.workdir / "journal.jsonl"
        self.gates = self.workdir / "gates"
        self.gates.mkdir()
        self.filter_env.update(LF_DB_JOURNAL=str(self.journal), LF_DB_GATES=str(self.gates))

    @property
    def state_url(self) -> str:
        """SQLAlchemy URL of the state database, for reading it from the test."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{self.sqlite_file}"

    @property
    def sqlite_file(self) -> Path:
        return self.app_dir / "var" / "state.db"

    def journal_events(self, tag: str) -> list[dict[str, Any]]:
        try:
            lines = self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [e for e in map(json.loads, lines) if e.get("tag") == tag]


class DbMilterDeployment(_StateDatabase, MilterDeployment):
    def __init__(self, database_url: str | None) -> None:
        super().__init__()
        self._setup_state_database(database_url)


class DbSmtpproxyDeployment(_StateDatabase, SmtpproxyDeployment):
    def __init__(self, database_url: str | None) -> None:
        super().__init__()
        self._setup_state_database(database_url)


DbDeployment = DbMilterDeployment | DbSmtpproxyDeployment


@pytest.fixture(scope="module")
def pg_module() -> Iterator[PgCluster]:
    """One private PostgreSQL cluster for the module (each deployment gets its own database)."""
    bindir = require_pg()
    with PgCluster(bindir=bindir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def deployments(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``get(mode, backend)``: a started deployment, one per (mode, backend) for the module."""
    require(*POSTFIX_BINARIES, root=True)
    started: dict[tuple[str, str], DbDeployment] = {}

    def get(mode: str, backend: str) -> DbDeployment:
        if (mode, backend) not in started:
            if mode == "milter":
                require_pymilter()
            url = None
            if backend == "postgresql":
                pg: PgCluster = request.getfixturevalue("pg_module")
                name = f"lf_{mode}"
                pg.create_database(name)
                url = pg.url_for(name)
            cls = DbMilterDeployment if mode == "milter" else DbSmtpproxyDeployment
            dep = cls(url)
            try:
                dep.start()
            except BaseException:
                dep.stop()
                raise
            started[(mode, backend)] = dep
        return started[(mode, backend)]

    yield get
    errors = []
    for dep in started.values():
        try:
            dep.stop()
        except Exception as exc:  # noqa: BLE001 -- keep stopping the others
            errors.append(f"{dep.mode}: {exc}")
    assert not errors, errors


# --------------------------------------------------------------------------- reading the database


def read_rows(url: str, sql: str, **params: Any) -> list[Any]:
    """Rows of `sql` on the state database behind `url` (a separate, short-lived connection)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(parsed)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def state_rows(dep: DbDeployment, keys: list[str]) -> dict[str, tuple[str, int, dict[str, Any]]]:
    """key -> (state, version, data) for those of `keys` that have a row."""
    found = {}
    for key in keys:
        for row in read_rows(dep.state_url, "SELECT state, version, data FROM lamsonfilter_state WHERE key = :k",
                             k=key):
            assert key not in found, f"two rows for {key}"
            found[key] = (row.state, row.version, json.loads(row.data))
    return found


def subscriber_key(sender: str) -> str:
    return f"mailinglist:python:{sender.lower()}"


# --------------------------------------------------------------------------- shared steps


def inject_subscribes(inj: Injector, senders: list[str]) -> list[Injected]:
    """One subscribe per sender, all at the same time (one SMTP session each)."""
    with ThreadPoolExecutor(max_workers=len(senders)) as pool:
        return [item for items in pool.map(
            lambda s: inj.inject(1, sender=s, rcpts=[SUBSCRIBE], subject="subscribe {seq}"), senders)
            for item in items]


def assert_deferred(dep: DbDeployment, sent: list[Injected]) -> None:
    """Every message deferred the way the mode defers (see `Deployment.assert_tempfailed`)."""
    for item in sent:
        dep.assert_tempfailed(item.result)
        if dep.mode == "smtpproxy":  # one log line with Postfix's queue id names the cause
            log = dep.filter_log.read_text(errors="replace")
            assert re.search(rf"queue_id={item.queue_id} .*tempfail: StorageUnavailable", log), dep.diagnostics()
            # the runtime's line says whose fault: the storage's, not the message's (deq counts no attempt)
            assert re.search(rf"queue_id={item.queue_id} via=smtpproxy .*decision=tempfail cause=storage", log), (
                dep.diagnostics())


def deferred_attempts(dep: DbDeployment, item: Injected) -> int:
    """How often Postfix's delivery of `item` to the content filter ended in ``451 4.3.0``."""
    assert dep.postfix is not None and item.queue_id is not None
    return len(re.findall(rf"{item.queue_id}: to=<[^>]*>,.* status=deferred .*451 4\.3\.0", dep.postfix.maillog()))


def keep_failing(dep: DbDeployment, inj: Injector, sent: list[Injected], attempts: int) -> list[Injected]:
    """While the database stays down: `attempts` deferrals per message in all (Postfix retries,
    or the milter's client resends), never an accept, never a quarantine."""
    if dep.mode == "smtpproxy":
        pf = dep.postfix
        assert pf is not None

        def deferred_often_enough() -> bool:
            queued = {str(q["queue_id"]) for q in pf.queue()}
            gone = [item.seq for item in sent if item.queue_id not in queued]
            assert not gone, f"left the queue while the database was down: {gone}\n{dep.diagnostics()}"
            return all(deferred_attempts(dep, item) >= attempts for item in sent)

        wait_for(deferred_often_enough, 120, interval=0.5,
                 message=lambda: f"{attempts} deferrals each; {dep.diagnostics()}")
        return sent
    for _ in range(attempts - 1):
        sent = [inj.resend(item) for item in sent]
        assert_deferred(dep, sent)
    return sent


def recover_and_account(dep: DbDeployment, inj: Injector, sent: list[Injected], scenario: str) -> Accounting:
    """The client resends what it was refused (milter), Postfix flushes its queue; count everything."""
    if dep.mode == "milter":
        sent = inj.resend_tempfailed(sent)
        assert all(item.accepted for item in sent), [str(item.result) for item in sent]
    acc = account(dep, sent, scenario=scenario)
    print(f"{scenario} [{dep.mode}]: {acc.summary()} replies={acc.replies}")
    acc.assert_nothing_lost(allow_queued=False)
    return acc


def assert_subscribed_once(dep: DbDeployment, senders: list[str], acc: Accounting, seqs: list[str]) -> None:
    """Exactly one START -> PENDING transition and one confirmation per subscriber."""
    # the subscribes were consumed by the application: an explicit drop, never a delivery
    assert set(seqs) <= acc.discarded, f"not discarded by the app: {set(seqs) - acc.discarded}"
    assert not (set(seqs) & acc.delivered), "a subscribe request was delivered"
    for s in senders:
        dep.wait_for_mail(s, CONFIRM_SUBJECT)
    dep.settle()  # anything still on its way would arrive before this marker
    counts = {s: len(dep.messages_to(s, CONFIRM_SUBJECT)) for s in senders}
    assert counts == {s: 1 for s in senders}, f"confirmations per subscriber: {counts}"
    rows = state_rows(dep, [subscriber_key(s) for s in senders])
    assert {k: (st, v) for k, (st, v, _) in rows.items()} == {
        subscriber_key(s): ("PENDING", 1) for s in senders
    }, f"state rows (state, version): {rows}"
    assert not [m for s in senders for m in dep.messages_to(s) if "Undelivered" in str(m.message["Subject"])]
    quarantine = dep.app_dir / "var" / "quarantine"
    kept = [f for f in quarantine.glob("*/*") if set(seqs_in_header(f.read_bytes())) & set(seqs)]
    assert not kept, f"quarantined instead of processed: {kept}"
    assert dep.postfix is not None and " status=bounced" not in dep.postfix.maillog()


# --------------------------------------------------------------------------- the rig itself


@pytest.mark.postgres
def test_pgcluster_stop_start_kill_keep_committed_data(pgcluster: PgCluster) -> None:  # noqa: F811
    """The harness-owned cluster: listens on loopback only, stops, restarts, survives SIGKILL."""
    import psycopg

    with psycopg.connect(pgcluster.conninfo, autocommit=True) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (1)")
    first = pgcluster.postmaster_pid()
    assert first is not None
    pgcluster.stop(mode="immediate")
    assert not pgcluster.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pgcluster.conninfo, connect_timeout=3).close()
    pgcluster.start()
    with psycopg.connect(pgcluster.conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    killed = pgcluster.kill()
    assert killed != first and not pgcluster.running
    pgcluster.start()  # crash recovery
    with psycopg.connect(pgcluster.conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT n FROM t ORDER BY n").fetchall() == [(1,), (2,)]


# --------------------------------------------------------------------------- D2


@pytest.mark.postgres
@pytest.mark.parametrize(("mode", "how"), [("smtpproxy", "pg_ctl stop -m immediate"), ("milter", "SIGKILL")])
def test_d2_postgresql_down_defers_then_one_transition_per_message(
    deployments: Any, pg_module: PgCluster, mode: str, how: str
) -> None:
    """Each mode meets one way of losing the database: an immediate stop, or SIGKILL of the postmaster."""
    dep = deployments(mode, "postgresql")
    run = f"d2{mode[0]}{uuid.uuid4().hex[:6]}"
    senders = [f"{run}-{i}@example.com" for i in range(SUBSCRIBERS)]
    inj = Injector(dep, run)
    pid = pg_module.postmaster_pid()
    if how == "SIGKILL":
        pg_module.kill()
    else:
        pg_module.stop(mode="immediate")
    try:
        sent = inject_subscribes(inj, senders)
        assert_deferred(dep, sent)
        sent = keep_failing(dep, inj, sent, OUTAGE_ATTEMPTS)
        # while the database is down nothing reached the destination for them
        assert not [m for s in senders for m in dep.messages_to(s)]
    finally:
        pg_module.start()
    assert pg_module.postmaster_pid() != pid
    acc = recover_and_account(dep, inj, sent, scenario=f"D2 PostgreSQL down ({how})")
    assert_subscribed_once(dep, senders, acc, [item.seq for item in sent])


# --------------------------------------------------------------------------- locked SQLite


def test_locked_sqlite_defers_then_delivers_once(deployments: Any) -> None:
    """Both modes in one test, at the same time: their 30 s busy timeouts overlap (CI time)."""
    deps = [deployments(mode, "sqlite") for mode in MODES]
    runs = [f"lk{dep.mode[0]}{uuid.uuid4().hex[:6]}" for dep in deps]
    senders = {dep.mode: [f"{run}-{i}@example.com" for i in range(SUBSCRIBERS)] for dep, run in zip(deps, runs)}
    injectors = {dep.mode: Injector(dep, run) for dep, run in zip(deps, runs)}
    holders = []

    def inject_while_locked(dep: DbDeployment) -> list[Injected]:
        sent = inject_subscribes(injectors[dep.mode], senders[dep.mode])
        assert_deferred(dep, sent)  # after the filter's busy timeout
        assert not [m for s in senders[dep.mode] for m in dep.messages_to(s)]
        assert dep.filter_proc is not None and dep.filter_proc.poll() is None, "the filter died"
        return sent

    try:
        for dep in deps:
            holder = sqlite3.connect(dep.sqlite_file, isolation_level=None, timeout=30)
            holders.append(holder)
            holder.execute("BEGIN EXCLUSIVE")
        with ThreadPoolExecutor(max_workers=len(deps)) as pool:
            sent = dict(zip((d.mode for d in deps), pool.map(inject_while_locked, deps)))
    finally:
        for holder in holders:
            holder.close()  # rolls the open transaction back: the lock is released
    for dep in deps:
        inj, items = injectors[dep.mode], sent[dep.mode]
        acc = recover_and_account(dep, inj, items, scenario="locked SQLite (BEGIN EXCLUSIVE)")
        assert_subscribed_once(dep, senders[dep.mode], acc, [item.seq for item in items])
        log = dep.filter_log.read_text(errors="replace")
        assert "database is locked" in log, "the tempfail should name the cause in the filter log"
        assert "Traceback" not in log


# --------------------------------------------------------------------------- D1


BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)]


def _advisory_waiters(dep: DbDeployment) -> int:
    return int(read_rows(dep.state_url, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                                        "AND NOT granted AND database = (SELECT oid FROM pg_database "
                                        "WHERE datname = current_database())")[0].n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_d1_two_messages_for_one_key_serialise(deployments: Any, mode: str, backend: str) -> None:
    dep = deployments(mode, backend)
    tag = f"d1{uuid.uuid4().hex[:10]}"
    rcpt = f"count-{tag}@{LIST_HOST}"
    gate = f"gate-{tag}"
    inj = Injector(dep, tag)
    results: dict[str, list[Injected]] = {}

    def send(name: str, **headers: str) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(
            name, inj.inject(1, sender=f"{tag}@example.com", rcpts=[rcpt], subject=f"D1 {name} {{seq}}",
                             extra_headers=headers)), daemon=True)
        t.start()
        return t

    def b_arrived() -> str | None:
        if len(dep.journal_events(tag)) > 1:
            return "B read the state"  # without the lock: while A holds it
        if backend == "postgresql" and _advisory_waiters(dep) >= 1:
            return "B waits for the key's advisory lock"  # positive evidence of the overlap
        return None

    first = send("A", **{"X-Test-Gate": gate})
    try:
        # A has read the state (n = 0) and waits at its gate, inside its transaction
        wait_for(lambda: any(e["event"] == "read" for e in dep.journal_events(tag)), 60,
                 message=lambda: f"the first message to reach its handler; {dep.diagnostics()}")
        second = send("B")
        if dep.mode == "smtpproxy":  # B is queued by Postfix, then handed to the filter
            wait_for(lambda: "B" in results, 60, message="Postfix to accept B")
        try:
            # SQLite shows no waiters: then this is only a bounded chance for B to read the
            # state without the lock (a broken implementation would read n = 0 here)
            wait_for(b_arrived, 60.0 if backend == "postgresql" else 3.0,
                     message=lambda: f"B to reach the filter; {dep.diagnostics()}")
        except TimeoutError:
            if backend == "postgresql":
                raise
        reads = [e for e in dep.journal_events(tag) if e["event"] == "read"]
        assert len(reads) == 1, f"B read the state while A held it: {reads}"
    finally:
        (dep.gates / gate).touch()  # A writes n = 1 and commits; only then B reads
    first.join(120)
    second.join(120)
    assert not first.is_alive() and not second.is_alive(), "a client is still waiting"
    sent = results["A"] + results["B"]
    if dep.mode == "milter":
        assert all(item.accepted for item in sent), [str(item.result) for item in sent]
    acc = account(dep, sent, scenario=f"D1 two messages for one key ({backend})")
    print(f"D1 [{mode}, {backend}]: {acc.summary()}")
    acc.assert_nothing_lost(allow_queued=False)
    assert acc.delivered == {item.seq for item in sent} and not acc.duplicates
    rows = state_rows(dep, [f"lfdb:{tag}"])
    assert rows[f"lfdb:{tag}"][2] == {"n": 2}, f"final state {rows} (serial result is n = 2)"
    events = dep.journal_events(tag)
    last_read = {e["seq"]: e["n"] for e in events if e["event"] == "read"}
    a, b = results["A"][0].seq, results["B"][0].seq
    assert last_read == {a: 0, b: 1}, f"journal: {events}"


# --------------------------------------------------------------------------- D4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_d4_parallel_first_messages_make_one_row(deployments: Any, mode: str, backend: str) -> None:
    dep = deployments(mode, backend)
    tag = f"d4{uuid.uuid4().hex[:10]}"
    inj = Injector(dep, tag)
    sent = inj.inject(PARALLEL_FIRST, sender=f"{tag}@example.com", rcpts=[f"count-{tag}@{LIST_HOST}"],
                      parallel=PARALLEL_FIRST, subject="D4 {seq}")
    if dep.mode == "milter":
        sent = inj.resend_tempfailed(sent)  # a 4xx (e.g. a lock timeout) is the client's to retry
    assert all(item.accepted for item in sent), [str(item.result) for item in sent if not item.accepted]
    acc = account(dep, sent, scenario=f"D4 {PARALLEL_FIRST} parallel first messages ({backend})")
    print(f"D4 [{mode}, {backend}]: {acc.summary()}")
    acc.assert_nothing_lost(allow_queued=False)
    assert len(acc.delivered) == PARALLEL_FIRST and not acc.duplicates
    rows = read_rows(dep.state_url, "SELECT key, data FROM lamsonfilter_state WHERE key LIKE :p", p=f"lfdb:{tag}%")
    assert [r.key for r in rows] == [f"lfdb:{tag}"], rows
    assert json.loads(rows[0].data) == {"n": PARALLEL_FIRST}
    events = dep.journal_events(tag)
    last_read = {e["seq"]: e["n"] for e in events if e["event"] == "read"}
    assert sorted(last_read.values()) == list(range(PARALLEL_FIRST)), f"reads: {sorted(last_read.values())}"
