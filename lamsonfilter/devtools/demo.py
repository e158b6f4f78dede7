"""``lamsonfilter demo``: an application behind a private Postfix on loopback, to try by hand.

What it starts, all under one work directory and on loopback ports only:

- a private Postfix instance (``postfix -c WORK/postfix/etc``) listening on
  127.0.0.1:PORT, which delivers all mail for example.com, example.net and
  example.org into one Maildir, ``WORK/mail/inbox/`` (Postfix's own
  virtual(8) delivery agent), and nothing anywhere else;
- lamsonfilter in front of it: ``lamsonfilter milter`` (default) or
  ``lamsonfilter smtpproxy`` (``--mode content-filter``), wired with the
  lines shipped in ``conf/postfix/``, with its outbox going to a loopback
  listener that does not filter again.

Each run starts afresh: by default in a new directory
``/tmp/lamsonfilter-demo-XXXXXX``; with ``--dir DIR``, what an earlier
demo left there (state, mail, queue, quarantine, logs) is removed first
unless ``--keep`` is given.  Nothing is written into the application's
directory.  Needs root (Postfix's master runs as root) and Debian's postfix
package.

Stopping: Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) all
stop exactly what the demo started -- Postfix (``postfix -c DIR stop``,
then whatever is left of its master's session, by PID), then the
lamsonfilter daemon (SIGTERM, then what is left of its session: content
filter workers) -- and only then write anything: the output may be a pipe
whose reader is gone (``make run 2>&1 | tee run.log`` and Ctrl-C kill tee
too), and every write is guarded, so a broken pipe or a hung-up terminal
cannot keep the stop from running.  Then the work directory is removed:
the demo's own entries, and the directory itself when nothing else is in
it; ``--keep`` keeps it (to read the mail and logs afterwards).

While it runs, ``WORK/demo.json`` records each process it started (PID
and start time, so a reused PID is never mistaken for one of them), the
sessions they lead and the ports; if the demo itself is killed with
SIGKILL, ``lamsonfilter demo --stop WORK`` uses it to stop the leftovers,
and the next demo's "port in use" error names them and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import procinfo
from .demobanner import banner, command_path
from .demostop import (
    STATE_FILE,
    STOP_WAIT,
    DemoError,
    end_session,
    port_in_use_message,
    remove_workdir,
    running_from,
    stop_leftovers,
    wipe,
)
from .localpostfix import (
    PrivatePostfix,
    RigUnavailable,
    free_port,
    port_accepts,
    wait_for,
)

__all__ = [
    "MAIL_DOMAINS",
    "STATE_FILE",
    "Demo",
    "DemoError",
    "lamsonfilter_argv",
    "new_workdir",
    "port_in_use_message",
    "stop_leftovers",
]

MAIL_DOMAINS = ("example.com", "example.net", "example.org")
NOBODY = 65534


def _conf(name: str) -> str:
    """A shipped Postfix snippet (conf/postfix/NAME), from the source tree."""
    path = Path(__file__).resolve().parents[2] / "conf" / "postfix" / name
    if not path.is_file():
        raise DemoError(f"{path} not found: run the demo from a checkout of lamsonfilter")
    return path.read_text()


def _service_lines(snippet: str, old_port: str, new_port: int) -> str:
    """The master.cf entries of a snippet (comments dropped), with the port changed."""
    lines = [line.replace(old_port, str(new_port)) for line in snippet.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(lines) + "\n"


def new_workdir() -> Path:
    """A fresh work directory under /tmp, searchable by Postfix's unprivileged users."""
    path = Path(tempfile.mkdtemp(prefix="lamsonfilter-demo-", dir="/tmp"))
    path.chmod(0o755)
    return path


def lamsonfilter_argv() -> list[str]:
    """How the demo starts lamsonfilter: this interpreter with ``-P``, so that a directory named
    ``lamsonfilter`` in the current directory (a clone next to the applications) cannot shadow
    the installed package."""
    return [sys.executable, "-P", "-m", "lamsonfilter"]


class Demo:
    """One demo run.  `workdir` None: a new directory under /tmp (see `new_workdir`)."""

    def __init__(self, app_dir: Path, workdir: Path | None, mode: str = "milter", port: int = 2525,
                 echo: Callable[[str], None] = print, keep: bool = False) -> None:
        if mode not in ("milter", "content-filter"):
            raise DemoError(f"unknown mode {mode!r}: milter or content-filter")
        self.app_dir = app_dir.resolve()
        self._owns_workdir = workdir is None  # the work directory is ours to remove at exit
        self.workdir = (workdir or new_workdir()).resolve()
        self.mode = mode
        self.port = port
        self.echo = echo
        self.keep = keep
        self.reinject_port = free_port()
        self.filter_port = free_port()
        self.policy_port = free_port()
        self.socket = self.workdir / "milter.sock"
        self.database = f"sqlite:///{self.workdir / 'state.db'}"
        self.postfix: PrivatePostfix | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.interrupted = False  # set by the signal handlers; start-up gives up when it is
        self._quiet = False  # stdout is gone (broken pipe, hung-up terminal): write nothing more
        self._failed = False  # something did not work: keep the work directory for its logs

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        self._app()  # a missing or broken application: its one-line error, before anything starts
        if os.geteuid() != 0:
            raise DemoError("the demo runs a private Postfix, whose master must start as root")
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise DemoError("Postfix is not installed: apt-get install postfix (or run scripts/bootstrap.sh)")
        if port_accepts(self.port):
            raise DemoError(port_in_use_message(self.port))
        busy = running_from(self.workdir)
        if busy:  # an earlier demo killed with SIGKILL: its record must not be wiped
            raise DemoError(f"an earlier demo in {self.workdir} left {busy} running; stop them with: "
                            f"{command_path()} demo --stop {self.workdir}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._owns_workdir = True
        if not self.keep:
            wipe(self.workdir)
        for d in [self.workdir, *self.workdir.parents]:
            if d.exists() and not d.stat().st_mode & 0o001:
                raise DemoError(f"{d} is not searchable by the postfix user; use a --dir under /tmp")
        mail = self.workdir / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, NOBODY, NOBODY)
        self._lamsonfilter("db", "init", "--app", str(self.app_dir), "--database", self.database)

    def _lamsonfilter(self, *args: str) -> None:
        proc = subprocess.run([*lamsonfilter_argv(), *args],  # noqa: S603 -- argv list, no shell, no message data
                              capture_output=True, text=True, timeout=120, start_new_session=True)
        if proc.returncode != 0:
            said = (proc.stderr.strip() or proc.stdout.strip()).removeprefix("lamsonfilter: ")
            raise DemoError(f"lamsonfilter {' '.join(args)}: {said}")

    def _postfix(self) -> PrivatePostfix:
        hosts = self._app_hosts()
        main_cf: dict[str, str | None] = {
            "relay_domains": ", ".join(hosts),
            # what lamsonfilter passes on for its own domains stays queued (conf/postfix/main.cf.domains)
            "transport_maps": "inline:{ " + ", ".join(
                f"{{{h} = lamsonfilter-kept:mail for {h} was not consumed by lamsonfilter}}" for h in hosts) + " }",
            "defer_transports": "lamsonfilter-kept",
            "virtual_mailbox_domains": ", ".join(MAIL_DOMAINS),
            "virtual_mailbox_base": str(self.workdir / "mail"),
            "virtual_mailbox_maps": "static:inbox/",  # one Maildir for everybody
            "virtual_uid_maps": f"static:{NOBODY}",
            "virtual_gid_maps": f"static:{NOBODY}",
            "default_transport": "error:the demo delivers only to example.com, example.net and example.org",
            "relay_transport": "error:the demo delivers only to example.com, example.net and example.org",
        }
        extra = ("virtual   unix  -       n       n       -       -       virtual\n"
                 "lamsonfilter-kept unix -  -       n       -       -       error\n")
        if self.mode == "milter":
            main_cf.update({
                "smtpd_milters": f"{{ unix:{self.socket}, default_action=tempfail }}",
                "milter_default_action": "tempfail",
                "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}",
            })
            extra += _service_lines(_conf("master.cf.milter"), "10026", self.reinject_port)
        else:
            main_cf.update({
                "content_filter": f"lamsonfilter:[127.0.0.1]:{self.filter_port}",
                "receive_override_options": "no_address_mappings",
                # unknown addresses at the app's hosts are refused before queueing
                "smtpd_recipient_restrictions": f"check_policy_service {{ inet:127.0.0.1:{self.policy_port}, "
                                                "default_action=DUNNO }, permit_mynetworks, reject_unauth_destination",
            })
            extra += _service_lines(_conf("master.cf.content_filter"), "10026", self.reinject_port)
        return PrivatePostfix(self.workdir / "postfix", smtpd_port=self.port, relay_port=free_port(),
                              main_cf=main_cf, master_cf_extra=extra)

    def _app_hosts(self) -> list[str]:
        from ..settings import load_settings

        hosts: list[str] = list(load_settings(self.app_dir)["HOSTS"])
        if not hosts:
            raise DemoError(f"{self.app_dir}: HOSTS is empty; the demo needs the domain the application owns")
        return hosts

    def _app(self) -> Any:
        """The application, loaded here for its routes (state is not touched)."""
        from ..app import StartupError
        from ..settings import load_app
        from ..memorystore import MemoryStorage

        try:
            return load_app(self.app_dir, {}, storage=MemoryStorage())
        except StartupError as exc:
            raise DemoError(str(exc)) from None

    def _start_daemon(self) -> None:
        log = open(self.workdir / "lamsonfilter.log", "ab")
        base = [*lamsonfilter_argv(), "-v"]
        if self.mode == "milter":
            args = ["milter", "--app", str(self.app_dir), "--socket", f"unix:{self.socket}",
                    "--relay", f"127.0.0.1:{self.reinject_port}", "--database", self.database]
        else:
            args = ["smtpproxy", "--app", str(self.app_dir), "--listen", f"127.0.0.1:{self.filter_port}",
                    "--reinject", f"127.0.0.1:{self.reinject_port}", "--policy", f"127.0.0.1:{self.policy_port}",
                    "--database", self.database, "--quarantine", str(self.workdir / "quarantine")]
        self.daemon = subprocess.Popen(base + args, stdout=log, stderr=log, start_new_session=True)  # noqa: S603 -- argv list, no shell
        log.close()

        def up() -> bool:
            assert self.daemon is not None
            if self.interrupted:
                raise DemoError("interrupted while starting")
            if self.daemon.poll() is not None:
                raise DemoError(f"lamsonfilter {args[0]} exited; see {self.workdir / 'lamsonfilter.log'}")
            return self.socket.exists() if self.mode == "milter" else port_accepts(self.filter_port)

        wait_for(up, 60.0, message="lamsonfilter to listen")

    def _record(self) -> None:
        """Write WORK/demo.json: what this run started (see the module docstring)."""
        def entry(pid: int | None) -> list[int | None] | None:
            return None if pid is None else [pid, procinfo.start_time(pid)]

        master = self.postfix.master_pid() if self.postfix is not None else None
        daemon = self.daemon.pid if self.daemon is not None else None
        record = {
            "processes": {"demo": entry(os.getpid()), "postfix": entry(master), "lamsonfilter": entry(daemon)},
            "sessions": [sid for sid in (master, daemon) if sid is not None],
            "ports": [self.port, self.reinject_port] + ([self.filter_port, self.policy_port]
                                                        if self.mode == "content-filter" else []),
            "workdir": str(self.workdir),
        }
        tmp = self.workdir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(self.workdir / STATE_FILE)

    # ------------------------------------------------------------ run
    def start(self) -> None:
        self._prepare()
        self._start_daemon()
        self._record()
        self.postfix = self._postfix()
        try:
            self.postfix.start()
        except (RigUnavailable, RuntimeError) as exc:
            raise DemoError(f"Postfix did not start: {exc}") from exc
        self._record()

    def stop(self) -> str:
        """Stop Postfix, then lamsonfilter, then remove the work directory (unless kept).

        Each step runs even if the one before failed.  Returns what happened to the work
        directory (writing is the caller's business: stop first, then write).
        """
        try:
            if self.postfix is not None:
                master = self.postfix.master_pid()
                started = procinfo.start_time(master) if master is not None else None
                try:
                    self.postfix.stop()
                finally:
                    self.postfix = None
                    end_session(master, started, STOP_WAIT)
        finally:
            if self.daemon is not None:
                if self.daemon.poll() is None:
                    self.daemon.send_signal(signal.SIGTERM)
                    try:
                        self.daemon.wait(STOP_WAIT)
                    except subprocess.TimeoutExpired:
                        self.daemon.kill()
                        self.daemon.wait(10)
                # what the daemon left of its session (content-filter workers), by PID
                end_session(self.daemon.pid, None, 5.0)
                self.daemon = None
        if not self._owns_workdir:
            return ""
        if self.keep:
            return f"kept {self.workdir} (--keep)"
        if self._failed:
            return f"kept {self.workdir} for its logs"
        return remove_workdir(self.workdir)

    def banner(self) -> str:
        logs = [self.workdir / "lamsonfilter.log"] + ([self.postfix.maillog_path] if self.postfix else [])
        text = banner(self._app(), self.app_dir, mode=self.mode, port=self.port, workdir=self.workdir,
                      mail_domains=MAIL_DOMAINS, logs=logs)
        after = "keeps" if self.keep else "removes"
        return text + f"\nCtrl-C stops Postfix and lamsonfilter and {after} the work directory.\n"

    def say(self, text: str) -> None:
        """Write a line unless stdout is gone; a write that fails silences the rest (never raises)."""
        if self._quiet:
            return
        try:
            self.echo(text)
            sys.stdout.flush()
        except (OSError, ValueError):
            self._quiet = True
            # later writes (and the interpreter's final flush) go nowhere instead of failing
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def run_until_interrupted(self) -> bool:
        """Start, print the banner, wait for Ctrl-C, SIGTERM or SIGHUP, stop; then say so.

        False when lamsonfilter exited on its own while the demo ran (its log is kept).
        """
        def handler(signum: int, frame: object) -> None:
            self.interrupted = True

        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {sig: signal.signal(sig, handler) for sig in watched}
        outcome = exited = ""
        failure: BaseException | None = None
        try:
            self.start()
            self.say(self.banner())
            self.say("ready")
            while not self.interrupted:
                if self.daemon is not None and self.daemon.poll() is not None:
                    self._failed = True
                    exited = (f"lamsonfilter exited (status {self.daemon.returncode}); "
                              f"see {self.workdir}/lamsonfilter.log")
                    break
                time.sleep(0.2)
        except BaseException as exc:
            failure = exc
            # keep the logs of a start-up that failed (not of one given up on Ctrl-C)
            self._failed = self.daemon is not None and not (self.interrupted and isinstance(exc, DemoError))
        finally:
            # stop first, then write: the output may be a pipe whose reader is gone
            try:
                outcome = self.stop()
            finally:
                for sig, previous in old.items():
                    signal.signal(sig, previous)
        if failure is not None:
            if self.interrupted and isinstance(failure, DemoError):
                self.say(f"stopped while starting; {outcome}")
                return True
            raise failure
        if exited:
            self.say(exited)
        self.say(f"stopped; {outcome}" if outcome else "stopped")
        return not exited
