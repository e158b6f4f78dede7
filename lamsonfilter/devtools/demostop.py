"""Stopping what ``lamsonfilter demo`` started, and cleaning up after it.

The demo (`lamsonfilter.devtools.demo`) starts a private Postfix, whose master(8)
daemonizes into a session of its own, and the lamsonfilter daemon in a new
session (the content filter forks its workers inside it).  Stopping them
means: the polite way first (``postfix -c DIR stop``, SIGTERM), then
whatever is still left in *those sessions*, by PID (`end_session`) -- never
anything found by name.

While a demo runs, ``WORK/demo.json`` (`STATE_FILE`) records each process
it started with its start time, so that a PID the system has since given
to an unrelated process is never taken for one of them.  If the demo
itself is killed with SIGKILL, `stop_leftovers` (``lamsonfilter demo
--stop WORK``) stops what it left, and the next demo, finding its port
taken, says by what and how to stop it (`port_in_use_message`).

At exit the work directory goes (`remove_workdir`): the demo's own
entries (`WORK_ENTRIES`), then the directory if nothing else is in it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import procinfo
from .demobanner import command_path
from .localpostfix import find_binary

__all__ = ["STATE_FILE", "STOP_WAIT", "WORK_ENTRIES", "DemoError", "end_session", "port_in_use_message",
           "remove_workdir", "running_from", "stop_leftovers", "wipe"]


class DemoError(Exception):
    """The demo cannot start (or stop); the message says why."""


#: The record of what a running demo started (see the module docstring), in its work directory.
STATE_FILE = "demo.json"

#: What a demo run leaves in its work directory (removed at exit, and at the start of a run
#: with --dir, unless kept).
WORK_ENTRIES = ("mail", "postfix", "quarantine", "attempts", "state.db", "state.db-journal",
                "state.db-wal", "state.db-shm", "outbox-sent", "milter.sock", "lamsonfilter.log", "trace.key",
                STATE_FILE)

#: How long each stop step waits before it uses SIGKILL (on the processes it started, by PID).
STOP_WAIT = 30.0


def wipe(workdir: Path) -> None:
    """Remove the demo's own entries from a work directory (nothing else)."""
    for name in WORK_ENTRIES:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def remove_workdir(workdir: Path) -> str:
    """Remove the demo's entries and then the directory if nothing else is left; say what happened."""
    wipe(workdir)
    try:
        workdir.rmdir()
    except FileNotFoundError:
        return f"removed {workdir}"
    except OSError:
        return f"removed the demo's files from {workdir} (kept the directory: it holds other files)"
    return f"removed {workdir}"


def end_session(sid: int | None, started: int | None, wait: float) -> None:
    """Wait for the processes of session `sid` (led by a process we started) to exit; SIGTERM,
    then SIGKILL, whatever is left after `wait` seconds.  Only when `sid`'s leader is known to
    be ours: recorded with its start time, or still our child."""
    if sid is None:
        return
    if started is not None and procinfo.start_time(sid) not in (None, started):
        return  # the PID now belongs to someone else
    deadline = time.monotonic() + wait
    for sig in (signal.SIGTERM, signal.SIGKILL):
        while procinfo.session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in procinfo.session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0


def port_in_use_message(port: int) -> str:
    """Why 127.0.0.1:PORT is taken and how to free it, as one line."""
    pids = procinfo.listeners(port)
    if not pids:
        return f"127.0.0.1:{port} is in use; choose another --port"
    for pid in pids:
        config = procinfo.environ_value(pid, "MAIL_CONFIG") if "master" in procinfo.command_line(pid) else None
        if config is None:
            continue
        work = Path(config).parent.parent  # WORK/postfix/etc
        if (work / STATE_FILE).is_file():
            return (f"127.0.0.1:{port} is in use by the Postfix of an earlier demo (master pid {pid}, "
                    f"work directory {work}); stop it and its lamsonfilter with: "
                    f"{command_path()} demo --stop {work}  (or choose another --port)")
        return (f"127.0.0.1:{port} is in use by a Postfix instance (master pid {pid}, configuration {config}); "
                f"stop it with: postfix -c {config} stop  (or choose another --port)")
    who = ", ".join(f"pid {pid} ({procinfo.command_line(pid) or '?'})" for pid in pids[:3])
    return f"127.0.0.1:{port} is in use by {who}; stop it (kill {pids[0]}) or choose another --port"


def running_from(workdir: Path) -> str | None:
    """What an earlier demo recorded in WORK/demo.json and is still running, as a phrase; else None."""
    try:
        record = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    alive = [f"{name} (pid {entry[0]})" for name, entry in record.get("processes", {}).items()
             if entry and procinfo.same_process(*entry)]
    return ", ".join(alive) or None


def stop_leftovers(workdir: Path, keep: bool = False) -> list[str]:
    """Stop what a demo that is gone (killed with SIGKILL) left running, from its WORK/demo.json.

    Only processes recorded there and still the same (PID and start time) are stopped, and
    the members of the sessions they lead.  Returns what was done, one line each.
    """
    try:
        record = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"{workdir}: no demo record ({STATE_FILE}: {exc}); nothing to stop") from None
    done = []
    demo_pid, demo_started = record["processes"].get("demo") or [None, None]
    if demo_pid is not None and procinfo.same_process(demo_pid, demo_started):
        raise DemoError(f"the demo in {workdir} is still running (pid {demo_pid}): stop it with kill {demo_pid}")
    postfix = record["processes"].get("postfix")
    if postfix and procinfo.same_process(*postfix):
        subprocess.run([find_binary("postfix") or "postfix", "-c", str(workdir / "postfix" / "etc"), "stop"],  # noqa: S603 -- argv list, no shell
                       capture_output=True, timeout=60, check=False, start_new_session=True)
        done.append(f"stopped Postfix (master pid {postfix[0]})")
    if postfix:
        end_session(postfix[0], postfix[1], STOP_WAIT)
    daemon = record["processes"].get("lamsonfilter")
    if daemon and procinfo.same_process(*daemon):
        os.kill(daemon[0], signal.SIGTERM)
        done.append(f"stopped lamsonfilter (pid {daemon[0]})")
    if daemon:
        end_session(daemon[0], daemon[1], STOP_WAIT)
    if not keep:
        done.append(remove_workdir(workdir))
    return done or ["nothing was running"]
