"""What the demo needs to know about processes, read from Linux's /proc.

The demo (``lamsonfilter demo``) starts processes that outlive a careless
parent: Postfix's master(8) daemonizes into a session of its own, the
lamsonfilter daemon is started in a new session, and the content filter
forks workers.  To stop exactly those and nothing else, the demo records
each one's PID *and* its start time (`start_time`: a PID can be reused by
an unrelated process once the original is gone; the pair cannot), and
stops the members of the sessions it created (`session_members`).

When the demo's port is taken, `listeners` names the process that holds it
(from ``/proc/net/tcp`` and the file descriptors under ``/proc/PID/fd``),
so the error can say what to stop instead of just "in use".

Everything here returns empty results rather than failing when /proc says
nothing (another user's process as non-root, a process that just exited).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["alive", "command_line", "environ_value", "listeners", "same_process", "session_members", "start_time"]

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (stat field 22); None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def same_process(pid: int, started: int | None) -> bool:
    """True if `pid` is still the process that started at `started` (not a reused PID)."""
    return started is not None and start_time(pid) == started and alive(pid)


def session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (a process started with setsid and its descendants)."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return sorted(found)


def command_line(pid: int) -> str:
    """The command line of `pid`, as one string ('' when unknown)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def listeners(port: int) -> list[int]:
    """The PIDs holding a listening TCP socket on `port` (any address); [] if none or unreadable."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return []
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) in wanted:
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(found)


def environ_value(pid: int, name: str) -> str | None:
    """The value of environment variable `name` in `pid` (as it started), if readable."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("utf-8", "replace")
    return None
