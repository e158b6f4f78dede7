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
directory.  Ctrl-C (or SIGTERM) stops exactly what it started.  Needs root
(Postfix's master runs as root) and Debian's postfix package.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .localpostfix import PrivatePostfix, RigUnavailable, free_port, port_accepts, wait_for

__all__ = ["Demo", "DemoError", "MAIL_DOMAINS", "new_workdir", "command_name"]

MAIL_DOMAINS = ("example.com", "example.net", "example.org")
NOBODY = 65534


class DemoError(Exception):
    """The demo cannot start; the message says why."""


def _conf(name: str) -> str:
    """A shipped Postfix snippet (conf/postfix/NAME), from the source tree."""
    path = Path(__file__).resolve().parents[1] / "conf" / "postfix" / name
    if not path.is_file():
        raise DemoError(f"{path} not found: run the demo from a checkout of lamsonfilter")
    return path.read_text()


def _service_lines(snippet: str, old_port: str, new_port: int) -> str:
    """The master.cf entries of a snippet (comments dropped), with the port changed."""
    lines = [line.replace(old_port, str(new_port)) for line in snippet.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(lines) + "\n"


#: What a demo run leaves in its work directory (removed at the start of the next run unless kept).
WORK_ENTRIES = ("mail", "postfix", "quarantine", "attempts", "state.db", "state.db-journal",
                "state.db-wal", "state.db-shm", "milter.sock", "lamsonfilter.log")


def new_workdir() -> Path:
    """A fresh work directory under /tmp, searchable by Postfix's unprivileged users."""
    path = Path(tempfile.mkdtemp(prefix="lamsonfilter-demo-", dir="/tmp"))
    path.chmod(0o755)
    return path


def command_name() -> str:
    """How to run ``lamsonfilter`` from a shell: the script next to the running interpreter
    (``.venv/bin/lamsonfilter`` after ``make run``), or plain ``lamsonfilter`` when that is on PATH."""
    script = Path(sys.executable).parent / "lamsonfilter"
    if not script.is_file():
        return f"{sys.executable} -m lamsonfilter"
    found = shutil.which("lamsonfilter")
    if found is not None and Path(found).resolve() == script.resolve():
        return "lamsonfilter"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


class Demo:
    def __init__(self, app_dir: Path, workdir: Path, mode: str = "milter", port: int = 2525,
                 echo: Callable[[str], None] = print, keep: bool = False) -> None:
        if mode not in ("milter", "content-filter"):
            raise DemoError(f"unknown mode {mode!r}: milter or content-filter")
        self.app_dir = app_dir.resolve()
        self.workdir = workdir.resolve()
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

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise DemoError("the demo runs a private Postfix, whose master must start as root")
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise DemoError("Postfix is not installed: apt-get install postfix (or run scripts/bootstrap.sh)")
        if port_accepts(self.port):
            raise DemoError(f"127.0.0.1:{self.port} is in use; choose another --port")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.keep:
            self._wipe()
        for d in [self.workdir, *self.workdir.parents]:
            if d.exists() and not d.stat().st_mode & 0o001:
                raise DemoError(f"{d} is not searchable by the postfix user; use a --dir under /tmp")
        mail = self.workdir / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, NOBODY, NOBODY)
        self._lamsonfilter("db", "init", "--app", str(self.app_dir), "--database", self.database)

    def _wipe(self) -> None:
        """Remove what an earlier run left in the work directory (only the demo's own entries)."""
        for name in WORK_ENTRIES:
            path = self.workdir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _lamsonfilter(self, *args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "lamsonfilter", *args],  # noqa: S603 -- argv list, no message data
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise DemoError(f"lamsonfilter {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")

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
        from .settings import load_settings

        hosts: list[str] = list(load_settings(self.app_dir)["HOSTS"])
        if not hosts:
            raise DemoError(f"{self.app_dir}: HOSTS is empty; the demo needs the domain the application owns")
        return hosts

    def _start_daemon(self) -> None:
        log = open(self.workdir / "lamsonfilter.log", "ab")
        base = [sys.executable, "-m", "lamsonfilter", "-v"]
        if self.mode == "milter":
            args = ["milter", "--app", str(self.app_dir), "--socket", f"unix:{self.socket}",
                    "--relay", f"127.0.0.1:{self.reinject_port}", "--database", self.database]
        else:
            args = ["smtpproxy", "--app", str(self.app_dir), "--listen", f"127.0.0.1:{self.filter_port}",
                    "--reinject", f"127.0.0.1:{self.reinject_port}", "--policy", f"127.0.0.1:{self.policy_port}",
                    "--database", self.database, "--quarantine", str(self.workdir / "quarantine")]
        self.daemon = subprocess.Popen(base + args, stdout=log, stderr=log, start_new_session=True)  # noqa: S603
        log.close()

        def up() -> bool:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise DemoError(f"lamsonfilter {args[0]} exited; see {self.workdir / 'lamsonfilter.log'}")
            return self.socket.exists() if self.mode == "milter" else port_accepts(self.filter_port)

        wait_for(up, 60.0, message="lamsonfilter to listen")

    # ------------------------------------------------------------ run
    def start(self) -> None:
        self._prepare()
        self._start_daemon()
        self.postfix = self._postfix()
        try:
            self.postfix.start()
        except (RigUnavailable, RuntimeError) as exc:
            raise DemoError(f"Postfix did not start: {exc}") from exc

    def stop(self) -> None:
        if self.postfix is not None:
            self.postfix.stop()
            self.postfix = None
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        self.daemon = None

    def banner(self) -> str:
        hosts = self._app_hosts()
        mode = "milter (pre-queue)" if self.mode == "milter" else "content filter (after-queue)"
        mail = self.workdir / "mail"
        cmd = command_name()
        return f"""\
lamsonfilter demo: {self.app_dir.name} as a {mode} behind a private Postfix

  Postfix listens on   127.0.0.1:{self.port}
  the application owns {', '.join(hosts)}
  work directory       {self.workdir}
  mailbox              {mail}/inbox/new/   (all mail to any user at {', '.join(MAIL_DOMAINS)})
  logs                 {self.workdir / 'lamsonfilter.log'}
                       {self.postfix.maillog_path if self.postfix else ''}

Try it (in another terminal):

  swaks --server 127.0.0.1:{self.port} --from alice@example.com --to python-subscribe@{hosts[0]}
  ls {mail}/inbox/new/                       # the confirmation request
  {cmd} send --server 127.0.0.1:{self.port} --from alice@example.com \\
      --to python-confirm-TOKEN@{hosts[0]}   # TOKEN from that message: you are a member
  {cmd} send --server 127.0.0.1:{self.port} --from alice@example.com --to python@{hosts[0]}
  swaks --server 127.0.0.1:{self.port} --from bob@example.net --to nosuchlist@{hosts[0]}   # 550 at RCPT

Ctrl-C stops Postfix and lamsonfilter.
"""

    def run_until_interrupted(self) -> None:
        stop = False

        def handler(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        old_int = signal.signal(signal.SIGINT, handler)
        old_term = signal.signal(signal.SIGTERM, handler)
        try:
            self.start()
            self.echo(self.banner())
            self.echo("ready")
            while not stop:
                if self.daemon is not None and self.daemon.poll() is not None:
                    self.echo(f"lamsonfilter exited (status {self.daemon.returncode}); see {self.workdir}/lamsonfilter.log")
                    break
                time.sleep(0.2)
        finally:
            self.echo("stopping ...")
            self.stop()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            self.echo("stopped")
