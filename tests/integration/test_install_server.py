"""README.rst's "Installing on a server", performed literally: scripts/install-server.sh in a scratch root.

The script runs the README's steps (Debian packages, the virtualenv and ``pip
install`` from this clone, the user from the sysusers file, the application
directory, the state directory, ``db init`` of the units' database, the unit
and /etc/default/lamsonfilter, the Postfix lines) with ``/opt``, ``/srv``,
``/var/lib`` and ``/etc/...`` below a scratch root and a private Postfix's
configuration directory as ``/etc/postfix``.  Then the installed unit's own
command lines run (ExecStartPre with ``+`` as root, ExecStart as the unit's
User= with its groups and UMask=, its Environment= and EnvironmentFile=), and
mail goes through Postfix in both modes.  The user is real (created by
systemd-sysusers, removed at the end); every process started here is stopped
by its PID.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import stat
import subprocess
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.rig.deploy import EXAMPLE, ROOT
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.postfix import (
    CaptureServer,
    PrivatePostfix,
    free_port,
    port_accepts,
    wait_for,
)

SCRIPT = ROOT / "scripts" / "install-server.sh"


@pytest.fixture(scope="module")
def scratch() -> Iterator[tuple[Path, str]]:
    """A scratch root every user can traverse, and the name of the service user the script creates."""
    require(*POSTFIX_BINARIES, "systemd-sysusers", "runuser", "setpriv", root=True)
    root = Path(f"/tmp/lf-install-{uuid.uuid4().hex[:8]}")
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    user = f"lfsvc{uuid.uuid4().hex[:5]}"
    try:
        yield root, user
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=60, check=False)
        subprocess.run(["groupdel", user], capture_output=True, timeout=60, check=False)
        if os.environ.get("LF_RIG_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)


def unit_commands(unit: Path) -> tuple[dict[str, str], list[str], list[str], dict[str, str]]:
    """(environment, ExecStartPre commands run as root, ExecStart argv, [Service] settings) of a unit."""
    env: dict[str, str] = {}
    service: dict[str, str] = {}
    pre: list[str] = []
    start: list[str] = []
    for line in unit.read_text().splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "EnvironmentFile":
            path = Path(value.lstrip("-"))
            if path.exists():
                for entry in path.read_text().splitlines():
                    if entry and not entry.startswith("#") and "=" in entry:
                        name, _, val = entry.partition("=")
                        env[name] = val
        elif key == "ExecStartPre":
            pre.append(value)
        elif key == "ExecStart":
            start = shlex.split(value)
        else:
            service[key] = value

    def expand(word: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)

    return env, [expand(p) for p in pre], [expand(w) for w in start], service


def run_unit(unit: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start the unit's ExecStart as its User= (setpriv), after its ExecStartPre=+ lines as root."""
    env, pre, argv, service = unit_commands(unit)
    for cmd in pre:
        assert cmd.startswith("+"), f"{unit}: ExecStartPre without '+' runs as the service user: {cmd}"
        subprocess.run(shlex.split(cmd[1:]), check=True, timeout=60)
    groups = [service["Group"], *service.get("SupplementaryGroups", "").split()]
    wrapper = ["setpriv", f"--reuid={service['User']}", f"--regid={service['Group']}",
               f"--groups={','.join(groups)}", "--"]
    umask = int(service.get("UMask", "0022"), 8)
    out = open(log, "ab")
    try:
        return subprocess.Popen(
            [*wrapper, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/",
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **env}, preexec_fn=lambda: os.umask(umask))
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def send(port: int, sender: str, rcpt: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@client.example.test>"
    msg.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.send_message(msg)


UNITS = {"milter": "lamsonfilter-milter", "content-filter": "lamsonfilter-smtpproxy", "queue": "lamsonfilter-deq"}


@pytest.mark.parametrize("mode", ["milter", "content-filter", "queue"])
def test_the_readme_installation_works_in_a_scratch_root(scratch: tuple[Path, str], mode: str) -> None:
    root, user = scratch
    work = root / f"pf-{mode}"
    listen, reinject, policy = (f"127.0.0.1:{free_port()}" for _ in range(3))
    # the rig's relay_domains has example.org, the parent of the list's domain: queue mode takes
    # lists.example.org into virtual_mailbox_domains, and a domain has one address class only
    main_cf = {"relay_domains": "example.com, example.net, example.test"} if mode == "queue" else {}
    with CaptureServer() as capture:
        pf = PrivatePostfix(work, smtpd_port=free_port(), relay_port=capture.port, main_cf=main_cf)
        proc = subprocess.run(
            ["bash", str(SCRIPT), mode, str(EXAMPLE)], capture_output=True, text=True, timeout=900, check=False,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("LAMSONFILTER_")},
                 "LF_ROOT": str(root), "LF_USER": user, "POSTFIX_CONFIG": str(pf.config_dir),
                 "LF_LISTEN": listen, "LF_REINJECT": reinject, "LF_POLICY": policy})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 error(s)" in proc.stdout, proc.stdout
        # what the README promises: the user, the directories and their owners, the database
        entry = pwd.getpwnam(user)
        state = root / "var/lib/lamsonfilter"
        assert state.stat().st_uid == entry.pw_uid and (state / "state.db").stat().st_uid == entry.pw_uid
        assert (root / "srv/lamsonfilter/app/config/settings.py").stat().st_uid == 0
        assert "postfix" in subprocess.run(["id", "-nG", user], capture_output=True, text=True, check=False).stdout.split()
        unit = root / "etc/systemd/system" / f"{UNITS[mode]}.service"
        spool = root / "var/spool/lamsonfilter"
        if mode == "queue":  # virtual_mailbox_base: the user's, where virtual(8) makes queue/ as the user
            assert spool.stat().st_uid == entry.pw_uid and stat.S_IMODE(spool.stat().st_mode) == 0o750
            assert pf.postconf("-h", "virtual_uid_maps").strip() == f"static:{entry.pw_uid}"
        log = root / f"{mode}.log"
        pf.start()
        daemon = run_unit(unit, log)
        try:
            if mode == "milter":
                sock = Path(pf.postconf("-h", "queue_directory").strip()) / "lamsonfilter" / "milter.sock"
                ready = lambda: sock.exists() or daemon.poll() is not None
            elif mode == "content-filter":
                port = int(listen.rsplit(":", 1)[1])
                ready = lambda: port_accepts(port) or daemon.poll() is not None
            else:  # deq listens nowhere: mail waits in the queue until it runs
                ready = lambda: True
            wait_for(ready, 60, message=lambda: f"the {mode} unit to start: {log.read_text(errors='replace')}")
            assert daemon.poll() is None, log.read_text(errors="replace")
            send(pf.smtpd_port, "alice@example.com", "python-subscribe@lists.example.org", "join")
            confirm = wait_for(
                lambda: [m for m in capture.messages if "alice@example.com" in m.rcpt_tos
                         and "Confirm" in str(m.message.get("Subject", ""))],
                60, message=lambda: f"the confirmation; {pf.maillog_tail(30)}\n{log.read_text(errors='replace')}")
            assert confirm[0].message["From"].startswith("python-confirm-")
            if mode == "queue":  # Postfix delivered into the queue as the user; deq took it out
                assert (spool / "queue").stat().st_uid == entry.pw_uid
                assert "status=sent (delivered to maildir)" in pf.maillog()
                wait_for(lambda: not list((spool / "queue" / "new").iterdir()), 60, message="an empty queue")
            if mode == "milter":  # the start-up line read the private Postfix: smtpd is not chrooted there
                assert f"Postfix: smtpd_milters = unix:{sock}" in log.read_text(errors="replace")
        finally:
            stop(daemon)
            pf.stop()
