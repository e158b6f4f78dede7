"""A private, harness-owned PostgreSQL cluster for fault tests (to stop the database by its PID while mail flows: docs/reliability.rst, D2).

The shared server on 127.0.0.1:5432 belongs to everybody on the machine; a
test that stops, kills or freezes a database needs its own.  `PgCluster`
runs ``initdb`` into a fresh ``/tmp/lf-pg-*`` directory and starts it with
``pg_ctl`` on a free loopback port::

    with PgCluster() as pg:                 # initdb + start + CREATE DATABASE
        storage = SQLAlchemyStorage(pg.url)
        pg.stop(mode="immediate")           # the database is gone ...
        pg.start()                          # ... and back, same data
        pg.kill()                           # SIGKILL of the postmaster this object started
        pg.start()                          # crash recovery, then accepting again

The cluster listens on 127.0.0.1 only (``listen_addresses``), its unix
socket lives inside the work directory, authentication is ``trust`` and
``fsync`` is off (a test cluster: speed over durability across a power
cut).  ``synchronous_commit`` stays on: with it off, a commit returns
before its WAL is written, and an immediate stop or a SIGKILL loses it --
exactly what the fault tests must not have happen behind their back.

``initdb`` and ``pg_ctl`` refuse to run as root: as root they run as the
``postgres`` user through ``runuser``, with the work directory owned by
that user.  The binaries come from ``LF_PG_BINDIR``, else PATH, else the
newest ``/usr/lib/postgresql/*/bin``.

Safety: every wait is bounded; the only processes ever signalled are the
postmaster whose PID this object read from *its* ``postmaster.pid``
(and, after a SIGKILL, it waits -- bounded -- for that postmaster's own
children to notice and exit); `cleanup` removes the directory
(``LF_RIG_KEEP=1`` keeps it).

The `pgcluster` pytest fixture gives a started cluster per test, skipped
when PostgreSQL's server binaries are missing -- failed instead under
``CI=true`` (`tests.rig.fixtures.require` semantics).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.rig.postfix import free_port, port_accepts, wait_for

__all__ = ["PgCluster", "PgUnavailable", "find_pg_bindir", "pgcluster", "require_pg"]

#: Upper bound for one initdb / pg_ctl command (the machine is shared and slow).
COMMAND_TIMEOUT = 120.0
#: The OS user that owns the cluster when the tests run as root.
PG_USER = "postgres"


class PgUnavailable(RuntimeError):
    """PostgreSQL's server binaries (or the postgres user, as root) are missing."""


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[str] = []
    if os.environ.get("LF_PG_BINDIR"):
        candidates.append(os.environ["LF_PG_BINDIR"])
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))

    def version(path: str) -> int:
        try:
            return int(Path(path).parent.name)
        except ValueError:
            return 0

    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True))
    for d in candidates:
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    return None


def require_pg() -> Path:
    """The server binaries' directory; skip the test without them (fail under CI=true)."""
    from tests.rig.fixtures import in_ci

    problem = None
    bindir = find_pg_bindir()
    if bindir is None:
        problem = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; set LF_PG_BINDIR"
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            problem = f"running as root, but there is no {PG_USER!r} user to own the cluster"
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        problem = f"psycopg is not installed ({exc}); run scripts/bootstrap.sh"
    if problem:
        if in_ci():
            pytest.fail(f"{problem} -- CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(problem)
    assert bindir is not None
    return bindir


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _exists(pid: int) -> bool:
    """True while `pid` exists at all (a zombie not yet reaped included)."""
    return os.path.exists(f"/proc/{pid}")


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (read from /proc; empty if none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry))
    return found


class PgCluster:
    """One private PostgreSQL cluster in its own ``/tmp`` directory, on a free loopback port."""

    def __init__(self, *, dbname: str = "lftest", port: int | None = None,
                 bindir: Path | None = None, settings: dict[str, str] | None = None) -> None:
        found = bindir or find_pg_bindir()
        if found is None:
            raise PgUnavailable("PostgreSQL server binaries not found; set LF_PG_BINDIR")
        self.bindir = found
        self.dbname = dbname
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="lf-pg-", dir="/tmp"))
        self.datadir = self.workdir / "data"
        self.socket_dir = self.workdir / "sock"
        self.logfile = self.workdir / "postgresql.log"
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "16MB",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self._initialised = False
        self._pids: set[int] = set()  # every postmaster PID this object started

    # ------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database (lamsonfilter maps it to psycopg 3)."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL of another database of this cluster (see `create_database`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def conninfo(self) -> str:
        """libpq connection string of the test database (for psycopg.connect)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={self.dbname} connect_timeout=5"

    # ------------------------------------------------------------ commands
    def _cmd(self, name: str, *args: str, check: bool = True,
             timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / name), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", PG_USER, "--", *argv]
        proc = subprocess.run(
            argv, cwd=self.workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=False, env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{name} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        return proc

    def initdb(self) -> None:
        """Create the cluster (idempotent); the work directory is handed to the postgres user."""
        if self._initialised:
            return
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        self.workdir.chmod(0o755)
        self._cmd("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        self.socket_dir.mkdir(mode=0o755)
        if os.geteuid() == 0:
            os.chown(self.socket_dir, pwd.getpwnam(PG_USER).pw_uid, pwd.getpwnam(PG_USER).pw_gid)
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# added by tests/rig/pgcluster.py\n")
            f.writelines(f"{name} = {value}\n" for name, value in self.settings.items())
        self._initialised = True

    # ------------------------------------------------------------ lifecycle
    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, read from *this* cluster's postmaster.pid (None if down)."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def start(self, timeout: float = 90.0) -> None:
        """``pg_ctl start -w``; returns once the server accepts connections (crash recovery included)."""
        self.initdb()
        if self.running:
            raise RuntimeError(f"{self} is already running")
        if port_accepts(self.port):
            raise RuntimeError(f"127.0.0.1:{self.port} is already in use by someone else")
        self._cmd("pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile),
                  "-w", "-t", str(int(timeout)), timeout=timeout + 30)
        pid = self.postmaster_pid()
        assert pid is not None, f"pg_ctl said started, but no postmaster.pid:\n{self.log_tail()}"
        self._pids.add(pid)
        wait_for(lambda: port_accepts(self.port), 30.0, message=lambda: f"{self} to listen; log:\n{self.log_tail()}")

    def create_database(self, name: str | None = None) -> None:
        """CREATE DATABASE `name` (default: `dbname`) if it does not exist yet."""
        import psycopg

        name = name or self.dbname
        assert name.replace("_", "").isalnum(), f"not a plain database name: {name!r}"

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=10",
                             autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """``pg_ctl stop -m MODE`` (smart, fast, immediate); waits until the port is closed."""
        assert mode in ("smart", "fast", "immediate"), mode
        pid = self.postmaster_pid()
        if pid is None:
            return
        self._cmd("pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)),
                  timeout=timeout + 30)
        self._wait_gone(pid, timeout)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int:
        """Send `sig` to the postmaster this object started; for SIGKILL also wait until it and
        its backends are gone.  Returns the PID signalled.  (SIGSTOP/SIGCONT: see `pause`.)"""
        pid = self.postmaster_pid()
        assert pid is not None and pid in self._pids, f"{self}: no running postmaster of ours to signal"
        children = _children(pid) if sig == signal.SIGKILL else []
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self._wait_gone(pid, timeout, children)
        return pid

    def pause(self) -> int:
        """SIGSTOP the postmaster: new connections hang (existing backends keep running)."""
        return self.kill(signal.SIGSTOP)

    def resume(self) -> int:
        """SIGCONT the postmaster after `pause`."""
        return self.kill(signal.SIGCONT)

    def _wait_gone(self, pid: int, timeout: float, children: list[int] | None = None) -> None:
        # backends notice the postmaster's death on their own (postmaster-death pipe); the
        # postmaster must also be reaped: a new one refuses to start while kill(old, 0) works
        wait_for(lambda: not _exists(pid) and not any(_alive(c) for c in children or ()), timeout,
                 message=lambda: f"postmaster {pid} (and its backends) to exit; log:\n{self.log_tail()}")
        self._pids.discard(pid)
        wait_for(lambda: not port_accepts(self.port, timeout=0.2), 10.0,
                 message=f"port {self.port} to be released")

    def cleanup(self) -> None:
        """Stop (immediately) if running, then remove the work directory (LF_RIG_KEEP=1 keeps it)."""
        try:
            pid = self.postmaster_pid()
            if pid is not None and pid in self._pids:
                try:
                    os.kill(pid, signal.SIGCONT)  # a paused postmaster cannot stop
                except ProcessLookupError:
                    pass
                try:
                    self.stop(mode="immediate", timeout=30)
                except Exception:  # noqa: BLE001 -- pg_ctl failed: SIGKILL our postmaster instead
                    if self.postmaster_pid() == pid:
                        self.kill(signal.SIGKILL, timeout=30)
        finally:
            if os.environ.get("LF_RIG_KEEP") != "1":
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ diagnostics
    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def __enter__(self) -> Self:
        try:
            self.start()
            self.create_database()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"PgCluster(127.0.0.1:{self.port}, {self.workdir})"


@pytest.fixture
def pgcluster() -> Iterator[PgCluster]:
    """A started private PostgreSQL cluster with an empty database ``lftest``; removed afterwards."""
    bindir = require_pg()
    with PgCluster(bindir=bindir) as cluster:
        yield cluster
