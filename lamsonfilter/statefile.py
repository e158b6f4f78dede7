"""The SQLite state file on disk: can the service's user write it?

A daemon whose user cannot write its SQLite database starts, says READY,
and then answers 451 to every routed message (``attempt to write a readonly
database``).  The usual cause is ``lamsonfilter db init`` run as root for a
service that runs as ``lamsonfilter``: the file, and the ``-wal`` and
``-shm`` files SQLite keeps next to it, belong to root.  SQLite needs to
write the file, its ``-wal``/``-shm``/``-journal`` companions, and the
directory (it creates and removes the companions there)::

    problem = write_problem(Path("/var/lib/lamsonfilter/state.db"), user="lamsonfilter")
    if problem:
        sys.exit(f"lamsonfilter: {problem}")

The daemons refuse to start on it (exit 2, one line), ``lamsonfilter check``
reports it as APP011, and ``lamsonfilter db init --owner USER`` hands the
files to the service's user.  The same goes for the outbox's sent journal
(``OUTBOX_JOURNAL``, `lamsonfilter.sentjournal`): a daemon that cannot
create its file there refuses to start, and ``check`` reports it as APP012.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .check.findings import Finding

__all__ = ["COMPANIONS", "chown_database", "daemon_write_problem", "journal_finding", "user_name",
           "writable_finding", "write_problem"]

#: The files SQLite keeps next to a database (WAL mode, rollback journal).
COMPANIONS = ("-wal", "-shm", "-journal")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _may_write(path: Path, uid: int | None, gids: set[int], need_exec: bool = False) -> bool:
    """Whether `uid` (None: this process, with its mounts) may write `path` (and enter it)."""
    if uid is None:
        return os.access(path, os.W_OK | (os.X_OK if need_exec else 0))
    if uid == 0:
        return True
    st = path.stat()
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    want = 2 | (1 if need_exec else 0)
    return bits & want == want


def _owner(path: Path) -> str:
    st = path.stat()
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {user_name(st.st_uid)}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


def write_problem(path: Path, user: str | None = None) -> str | None:
    """Why `user` (default: this process) cannot use the SQLite database `path`, or None.

    A missing database file is no problem here (``db init`` creates it); a
    missing directory is.  The answer is one line naming the file, the user
    and how to fix it.
    """
    if user is None:
        uid: int | None = None
        who = user_name(os.geteuid())
        gids: set[int] = set()
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return f"the state database {path} is meant for user {user}, which does not exist"
        uid, who = entry.pw_uid, user
        gids = set(os.getgrouplist(user, entry.pw_gid))
    directory = path.parent
    if not directory.is_dir():
        return f"the state database's directory {directory} does not exist (user {who})"
    bad: list[Path] = []
    if not _may_write(directory, uid, gids, need_exec=True):
        bad.append(directory)
    for candidate in [path, *(Path(f"{path}{suffix}") for suffix in COMPANIONS)]:
        if candidate.exists() and not _may_write(candidate, uid, gids):
            bad.append(candidate)
    if not bad:
        return None
    what = "; ".join(f"{p} ({_owner(p)})" for p in bad)
    return (f"the state database {path} is not writable by user {who}: {what}; "
            f"fix: chown {who} {' '.join(str(p) for p in bad)} "
            f"(or run `lamsonfilter db init --owner {who}` as root)")


def chown_database(path: Path, user: str) -> list[Path]:
    """Give the database file and its companions to `user` (and its primary group); the files changed."""
    entry = pwd.getpwnam(user)
    changed = []
    for candidate in [path, *(Path(f"{path}{suffix}") for suffix in COMPANIONS)]:
        if candidate.exists():
            os.chown(candidate, entry.pw_uid, entry.pw_gid)
            changed.append(candidate)
    return changed


def _database_file(settings: Mapping[str, Any]) -> Path | None:
    from .settings import sqlite_path

    return sqlite_path(settings["DATABASE_URL"], settings["APP_DIR"])


def daemon_write_problem(settings: Mapping[str, Any]) -> str | None:
    """Why this process (a daemon about to start) cannot write its existing SQLite database, or None."""
    path = _database_file(settings)
    if path is None or not path.exists():
        return None  # no SQLite, or no file yet: the schema check says "run db init"
    return write_problem(path)


def writable_finding(settings: Mapping[str, Any], user: str | None) -> list[Finding]:
    """APP011 for ``lamsonfilter check``: the service's user cannot write the SQLite database.

    `user` None means this user; but root may write anything, so ``check`` run
    as root judges for the owner of the database's directory (the service's
    user, as with the units' ``/var/lib/lamsonfilter``), unless that is root too.
    """
    path = _database_file(settings)
    if path is None or not path.parent.exists():
        return []
    if user is None and os.geteuid() == 0:
        owner = path.parent.stat().st_uid
        if owner != 0:
            try:
                user = pwd.getpwuid(owner).pw_name
            except KeyError:
                user = None
    problem = write_problem(path, user)
    if problem is None:
        return []
    text, _, fix = problem.partition("; fix: ")
    return [Finding("APP011", "error", text + ": the daemons answer 451 to every routed message",
                    fix or "give the files to the service's user")]


def journal_finding(settings: Mapping[str, Any], user: str | None) -> list[Finding]:
    """APP012 for ``lamsonfilter check``: the service's user cannot make its sent journal file in
    the journal directory (``OUTBOX_JOURNAL``; missing parts are created, so the nearest existing
    one must be writable).  `user` as in `writable_finding` (root judges for that directory's owner).

    Judged only where ``check`` knows the daemons' directory: OUTBOX_JOURNAL set, or beside a
    SQLite database.  Otherwise the units' ``$STATE_DIRECTORY`` decides, which ``check`` does not see.
    """
    from .settings import journal_dir

    if not settings.get("OUTBOX_JOURNAL") and _database_file(settings) is None:
        return []
    directory = journal_dir(settings)
    if directory is None:
        return []
    there = directory
    while not there.exists() and there != there.parent:
        there = there.parent
    if user is None and os.geteuid() == 0 and there.stat().st_uid != 0:
        user = user_name(there.stat().st_uid)
    who = user or user_name(os.geteuid())
    if not there.is_dir():
        problem = f"{there} is not a directory"
    else:
        try:
            entry = pwd.getpwnam(user) if user is not None else None
        except KeyError:
            return []  # APP011 or the daemons' start names a user that does not exist
        uid = entry.pw_uid if entry is not None else None
        gids = set(os.getgrouplist(user, entry.pw_gid)) if entry is not None and user is not None else set()
        if _may_write(there, uid, gids, need_exec=True):
            return []
        problem = f"{there} ({_owner(there)}) is not writable by user {who}"
    return [Finding(
        "APP012", "error",
        f"the outbox's sent journal directory {directory} (OUTBOX_JOURNAL) cannot be made or written: "
        f"{problem}: the daemons refuse to start",
        f"chown {who} {there}, or set OUTBOX_JOURNAL to a directory user {who} may write")]
