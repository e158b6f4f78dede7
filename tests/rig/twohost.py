"""Two filter hosts on one PostgreSQL database: the rig of issue 16 ("several filter hosts").

What a `TwoHostRig` runs, all on loopback:

* one **PostgreSQL database of its own** on the server at 127.0.0.1:5432
  (`SharedDatabase`: ``CREATE DATABASE lf_twohost_<random>`` at start,
  ``DROP DATABASE ... WITH (FORCE)`` at the end; the server URL comes from
  ``$LAMSONFILTER_TEST_PG_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``);
* one `CaptureServer`, the final destination of every host's mail;
* two **hosts**, each a complete deployment of tests/rig/deploy.py
  in its own ``/tmp/lf-MODE-*`` directory: a private Postfix (own
  configuration, queue, log and ports, relaying to the shared capture
  server) and its own ``lamsonfilter`` process -- ``milter`` or
  ``smtpproxy`` per host (``TwoHostRig(("milter", "smtpproxy"))``) --
  running a copy of examples/mailinglist whose ``DATABASE_URL`` names the
  shared database.  Each host's outbox goes to its own Postfix's
  reinjection listener, as on two real machines.

Helpers for tests::

    with TwoHostRig(("smtpproxy", "milter")) as rig:
        rig.send(0, "a@x.example", ["python-subscribe@lists.example.org"], "join")  # via host A
        rig.kill(1)        # SIGKILL host B's lamsonfilter (the PID the rig started)
        rig.restart(1)     # and start it again
        rig.settle()       # both outboxes drained, both Postfix queues quiet
        rig.capture.messages

The hosts are ordinary `Deployment` objects (``rig.hosts[i]``), so the
accounting harness (tests/rig/accounting.py: `Injector`,
`delivered_seqs`) works on each of them: `make_host` is the mode's
`Deployment` given the shared database (in ``settings``) and the shared
capture server.

Test settings written into both applications: ``REPLY_BUDGET = (2000, 30)``
(the default 300 replies a minute per process would be the limit under
test, not the outbox: a 200-subscriber run sends 400 replies in about a
minute) and ``OUTBOX_LEASE = 15`` (`RIG_LEASE`: a SIGKILLed host's claimed
outbox messages are taken over after 15 s instead of 5 minutes; an SMTP
transaction to the loopback capture server takes well under a second, so
the lease cannot run out mid-send and cause a second copy).

Safety: loopback only; every wait is bounded; the only processes signalled
are the filter processes and Postfix masters this rig started; the only
database dropped is the one it created.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from tests.rig.deploy import Deployment
from tests.rig.modes import deployment_class
from tests.rig.postfix import CaptureServer
from tests.rig.submission import SendResult

__all__ = ["HOST_MODES", "PG_SERVER_URL", "RIG_LEASE", "SharedDatabase", "TwoHostRig", "make_host"]

#: The PostgreSQL server the rig creates its database on (any database of it to connect to).
PG_SERVER_URL = os.environ.get("LAMSONFILTER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
HOST_MODES = ("smtpproxy", "milter")
#: The outbox lease (seconds) the rig's applications run with (setting OUTBOX_LEASE).
RIG_LEASE = 15.0
#: The settings the rig adds to each host's copy of the example application.
RIG_SETTINGS = f"REPLY_BUDGET = (2000, 30)\nOUTBOX_LEASE = {RIG_LEASE!r}\n"


class SharedDatabase:
    """A fresh database ``lf_twohost_<random>`` on `PG_SERVER_URL`'s server, dropped by `drop`."""

    def __init__(self, server_url: str = PG_SERVER_URL, prefix: str = "lf_twohost") -> None:
        self.server_url = server_url
        self.name = f"{prefix}_{secrets.token_hex(4)}"
        self._created = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the new database (the server URL with its database replaced)."""
        base, _, _ = self.server_url.rpartition("/")
        return f"{base}/{self.name}"

    def _admin(self) -> object:
        import psycopg

        dsn = self.server_url.replace("postgresql+psycopg://", "postgresql://")
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    def create(self) -> SharedDatabase:
        import psycopg

        conn = self._admin()
        assert isinstance(conn, psycopg.Connection)
        with conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self._created = True
        return self

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """The rows of one read-only query on the database (to count what the hosts wrote)."""
        import psycopg

        dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    def drop(self) -> None:
        """Drop the database this object created (FORCE: ends the hosts' leftover sessions)."""
        if not self._created:
            return
        import psycopg

        conn = self._admin()
        assert isinstance(conn, psycopg.Connection)
        with conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._created = False


def make_host(mode: str, database_url: str, capture: CaptureServer) -> Deployment:
    """One host of `mode` (``smtpproxy`` or ``milter``): the scenarios' application on the shared
    database with `RIG_SETTINGS`, relaying to the shared `capture` server (which the rig starts and stops)."""
    if mode not in HOST_MODES:
        raise ValueError(f"unknown host mode {mode!r}; one of {HOST_MODES}")
    settings = f"DATABASE_URL = {database_url!r}\n{RIG_SETTINGS}"
    return deployment_class(mode)(settings=settings, capture=capture)


class TwoHostRig:
    """Two (or more) filter hosts, one PostgreSQL database, one capture server; see the module doc."""

    def __init__(self, modes: Sequence[str] = ("smtpproxy", "smtpproxy"),
                 database: SharedDatabase | None = None) -> None:
        assert len(modes) >= 2, "a rig of several hosts needs at least two"
        self.modes = tuple(modes)
        self.database = database or SharedDatabase()
        self.capture = CaptureServer()
        self.hosts: list[Deployment] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Database, capture server, then each host (application, filter, Postfix)."""
        try:
            self.database.create()
            self.capture.start()
            for mode in self.modes:
                host = make_host(mode, self.database.url, self.capture)
                self.hosts.append(host)
                host.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every host (filter and Postfix), the capture server; drop the database."""
        errors: list[str] = []
        for host in reversed(self.hosts):
            try:
                host.stop()
            except Exception as exc:  # noqa: BLE001 -- keep stopping the others
                errors.append(f"{host.mode} host {host.workdir}: {exc}")
        self.hosts = []
        self.capture.stop()
        try:
            self.database.drop()
        except Exception as exc:  # noqa: BLE001 -- reported below, with the others
            errors.append(f"DROP DATABASE {self.database.name}: {exc}")
        if errors:
            raise RuntimeError("two-host rig: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ one host's filter
    def pid(self, i: int) -> int | None:
        """PID of host `i`'s lamsonfilter process (None when it is not running)."""
        proc = self.hosts[i].filter_proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill(self, i: int) -> int:
        """SIGKILL host `i`'s lamsonfilter (the PID this rig started); returns that PID."""
        pid = self.pid(i)
        assert pid is not None, f"host {i}'s filter is not running"
        self.hosts[i].kill_filter()
        return pid

    def restart(self, i: int) -> int:
        """Start host `i`'s lamsonfilter again (after `kill` or `stop_filter`); the new PID."""
        self.hosts[i].start_filter()
        pid = self.pid(i)
        assert pid is not None
        return pid

    def stop_filter(self, i: int) -> int | None:
        """SIGTERM host `i`'s lamsonfilter and wait for it; its exit status."""
        return self.hosts[i].stop_filter()

    # ------------------------------------------------------------ mail
    def send(self, i: int, sender: str, rcpts: list[str], subject: str, body: str = "test\n",
             headers: dict[str, str] | None = None) -> SendResult:
        """One SMTP transaction through host `i`'s Postfix (a `SendResult`; never raises)."""
        return self.hosts[i].send(sender, rcpts, subject, body, headers)

    def flush(self) -> None:
        """``postqueue -f`` on every host: deferred mail is tried again now."""
        for host in self.hosts:
            if host.postfix is not None:
                host.postfix.flush()

    def settle(self, timeout: float = 120.0) -> None:
        """Every host's outbox drained, a marker through each host delivered, queues quiet."""
        for host in self.hosts:
            host.settle(timeout)

    def queued(self) -> int:
        """Messages in all hosts' Postfix queues."""
        return sum(len(h.postfix.queue()) for h in self.hosts if h.postfix is not None)

    def diagnostics(self) -> str:
        return "\n".join(f"=== host {i} ({h.mode}) ===\n{h.diagnostics()}" for i, h in enumerate(self.hosts))
