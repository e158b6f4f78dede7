"""A private Postfix instance on loopback: for the demo, the benchmarks and the integration tests.

``PrivatePostfix`` writes a complete, self-contained Postfix configuration
(``main.cf`` and ``master.cf`` written from scratch, no chroot, its own
queue and data directories and log file) under a work directory and runs
it with ``postfix -c DIR``.  It only listens on 127.0.0.1, never does DNS,
and by default relays *all* mail to ``[127.0.0.1]:relay_port``.  It is
stopped with ``postfix -c DIR stop`` (and, as a last resort, by the PID of
the master process it started; never by process name).

Needs root (``postfix start`` runs ``master(8)`` as root) and Debian's
``postfix`` package.  The work directory and its ancestors must be
traversable by the ``postfix`` user (so not below a 0700 directory such as
pytest's ``tmp_path``), and short if unix-socket milters live inside it
(``sun_path`` is 108 bytes).

    with PrivatePostfix(workdir, smtpd_port=free_port(), relay_port=sink_port,
                        main_cf={"smtpd_milters": "inet:127.0.0.1:8894"}) as pf:
        smtplib.SMTP("127.0.0.1", pf.smtpd_port).sendmail(...)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .machine import RigUnavailable, find_binary, free_port, missing_binaries, port_accepts, wait_for

__all__ = [
    "PrivatePostfix",
    "RigUnavailable",
    "find_binary",
    "free_port",
    "missing_binaries",
    "port_accepts",
    "wait_for",
]

T = TypeVar("T")

#: Recipient domains Postfix accepts from *any* client (RFC 2606 reserved names), so a
#: test can pose as a remote client with XCLIENT and still have its mail relayed.
TEST_DOMAINS = "example.com, example.net, example.org, example.test"

#: Upper bound for one command of the postfix suite (postfix check/start/stop, postqueue).
COMMAND_TIMEOUT = 60.0


# --------------------------------------------------------------------------- Postfix

_MASTER_CF = """\
# ==========================================================================
# service type  private unpriv  chroot  wakeup  maxproc command + args
#               (yes)   (yes)   (no)    (never) (100)
# ==========================================================================
127.0.0.1:{smtpd_port} inet n   -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """A private Postfix instance under ``workdir`` (see the module docstring).

    Layout: ``workdir/etc`` (config: main.cf, master.cf), ``workdir/spool`` (queue),
    ``workdir/data`` (data_directory, owned by postfix), ``workdir/log/maillog``.

    ``main_cf`` entries override/extend the generated main.cf (a value of ``None``
    removes a default); ``master_cf_extra`` is appended to master.cf verbatim (e.g. a
    content-filter transport and a re-injection smtpd).
    """

    hostname = "rig.localdomain"

    def __init__(
        self,
        workdir: Path,
        *,
        smtpd_port: int,
        relay_port: int,
        main_cf: Mapping[str, str | None] | None = None,
        master_cf_extra: str = "",
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.smtpd_port = smtpd_port
        self.relay_port = relay_port
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "log"
        self.maillog_path = self.log_dir / "maillog"
        self._main_cf_overrides = dict(main_cf or {})
        self._master_cf_extra = master_cf_extra
        self._master_pid: int | None = None
        self.write_config()

    # ----------------------------------------------------------------- configuration
    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf parameters this instance is written with (after overrides)."""
        relay = f"smtp:[127.0.0.1]:{self.relay_port}"
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": self.hostname,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": TEST_DOMAINS,
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "default_transport": relay,
            "relay_transport": relay,
            "relayhost": "",
            "soft_bounce": "no",
            "milter_default_action": "tempfail",
            # Pinned: their defaults differ between Postfix releases (3.9: normalize).
            "smtpd_forbid_bare_newline": "yes",
            "smtpd_forbid_bare_newline_exclusions": "",
            "smtpd_forbid_unauth_pipelining": "yes",
            "smtpd_authorized_xclient_hosts": "127.0.0.1",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            # Fast retries: a deferred message is retried after ~2-3 s.  Not below 3s:
            # qmgr takes deferred files whose mtime (deferral time + backoff) is up to
            # 1 s in the future, and a file the delivery agent has not unlocked yet is
            # parked in the *incoming* queue for 60 s ("skipped, still being delivered").
            "queue_run_delay": "1s",
            "minimal_backoff_time": "3s",
            "maximal_backoff_time": "6s",
            "smtp_connect_timeout": "5s",
            "biff": "no",
            "append_dot_mydomain": "no",
        }
        for key, value in self._main_cf_overrides.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        return settings

    def write_config(self) -> None:
        """(Re)write main.cf and master.cf and create the directories."""
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # postfix-script warns (and data_directory users fail) otherwise
            shutil.chown(self.data_dir, user="postfix", group="postfix")
        lines = ["# private test instance - generated by lamsonfilter.devtools.localpostfix"]
        lines += [f"{k} = {v}".rstrip() for k, v in self.main_cf_settings().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        master = _MASTER_CF.format(smtpd_port=self.smtpd_port)
        if self._master_cf_extra:
            master += self._master_cf_extra.rstrip("\n") + "\n"
        (self.config_dir / "master.cf").write_text(master)

    def set_main_cf(self, **settings: str | None) -> None:
        """Change main.cf parameters (rewrites the file); call :meth:`reload` after."""
        self._main_cf_overrides.update(settings)
        self.write_config()

    # ----------------------------------------------------------------- commands
    def _run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = find_binary(name)
        if binary is None:
            raise RigUnavailable(f"{name} not found (install Debian's postfix package)")
        proc = subprocess.run(  # noqa: S603 -- argv list, no shell, no message data
            [binary, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            # not in our process group: a Ctrl-C at the terminal reaches us, not a half-done
            # `postfix start` (which could leave a master behind before it wrote its pid file)
            start_new_session=True,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{name} -c {self.config_dir} {' '.join(args)} exited {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}\n--- maillog tail ---\n{self.maillog_tail()}"
            )
        return proc

    def postconf(self, *args: str) -> str:
        """``postconf -c DIR ARGS...``; returns stdout."""
        return self._run("postconf", *args).stdout

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` objects (queue_name, queue_id, sender, recipients ...)."""
        out = self._run("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """``postqueue -f``: attempt to deliver all queued mail now.

        Flushing ignores the retry times; a message whose delivery agent still holds its
        lock (milliseconds after a deferral) is parked in ``incoming`` for 60 s instead.
        """
        self._run("postqueue", "-f")

    def delete_queue(self) -> None:
        """``postsuper -d ALL``."""
        self._run("postsuper", "-d", "ALL")

    def maillog(self) -> str:
        """The whole maillog so far ('' before the first line is written)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maillog_tail(self, lines: int = 30) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
        """:func:`wait_for` with the maillog tail in the timeout error."""
        return wait_for(
            predicate,
            timeout,
            interval=interval,
            message=lambda: f"condition on {self}; maillog tail:\n{self.maillog_tail()}",
        )

    # ----------------------------------------------------------------- lifecycle
    def master_pid(self) -> int | None:
        """PID of this instance's running master(8), if any."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    @property
    def running(self) -> bool:
        return self.master_pid() is not None

    def start(self, timeout: float = 30.0) -> None:
        """``postfix check`` + ``postfix start``; returns when smtpd accepts connections."""
        if os.geteuid() != 0:
            raise RigUnavailable("a private Postfix instance must be started as root")
        if self.running:
            raise RuntimeError(f"{self} is already running")
        if port_accepts(self.smtpd_port):
            raise RuntimeError(f"127.0.0.1:{self.smtpd_port} is already in use by someone else")
        self._check_traversable()
        self._run("postfix", "check")  # creates the queue directories; ~2 s
        # postfix-script start would run the same checks again; its quick-start file
        # (removed by start itself) skips them once
        (self.queue_dir / "quick-start").touch()
        self._run("postfix", "start")
        self._master_pid = self.master_pid()
        _RUNNING.add(self)
        try:
            self.wait_for(lambda: self._smtpd_greets(), timeout, interval=0.1)
        except BaseException:
            self.stop()
            raise

    def _check_traversable(self) -> None:
        """master(8) opens data_directory/master.lock as the postfix user: every ancestor
        of the work directory must be searchable by others (pytest's tmp_path is not)."""
        for d in [self.workdir, *self.workdir.parents]:
            if d.exists() and not d.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{d} is not searchable by the postfix user (mode "
                    f"{d.stat().st_mode & 0o777:o}); put the work directory elsewhere, e.g. "
                    "tempfile.mkdtemp(dir='/tmp') + chmod 0755 as the postfix_factory fixture does"
                )

    def _smtpd_greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=2) as s:
                s.settimeout(5)
                ok = s.recv(512).startswith(b"220")
                s.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix -c DIR stop``; waits for the master to exit (KILLs *its* PID last)."""
        _RUNNING.discard(self)
        pid = self.master_pid() or self._master_pid
        if pid is None:
            return
        self._run("postfix", "stop", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            if _alive(pid) and pid == self._master_pid:
                os.kill(pid, signal.SIGKILL)
        self._master_pid = None
        # smtpd children exit right after the master; let the listening port go
        wait_for(
            lambda: not port_accepts(self.smtpd_port, timeout=0.2),
            5.0,
            message=f"port {self.smtpd_port} to be released",
        )

    def reload(self) -> None:
        """``postfix -c DIR reload`` (re-reads main.cf/master.cf)."""
        self._run("postfix", "reload")

    def __enter__(self) -> PrivatePostfix:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PrivatePostfix({str(self.workdir)!r}, smtpd_port={self.smtpd_port}, relay_port={self.relay_port})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RUNNING: set[PrivatePostfix] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Do not leave a master(8) behind if a test run ends without its teardown."""
    for pf in list(_RUNNING):
        try:
            pf.stop(timeout=10)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
