"""The sent journal: what this process handed to the relay, on disk within microseconds of the ``250``.

An outbox message is sent once when the record that it was sent survives
the sender.  The database's "sent" cannot be that record: its transaction
comes after the relay's ``250``, and on SQLite it waits for the one write
lock behind the workers' transactions (up to about a second), so a
process killed in between has sent the message and left it pending; the
sender that takes the claim over after ``OUTBOX_LEASE`` sends it again.
No SMTP client can close that window -- the relay cannot be asked whether
it has a message -- but it can be made short.  The journal does that:

* right after each SMTP transaction the relay accepted, the outbox worker
  appends one line to its own journal -- the outbox id, a token of the
  message (`sent_token`, so a reused id or another database's row is never
  taken for it) and the recipients the relay accepted -- with one
  ``os.write`` (`SentJournal.record`).  A ``kill -9`` cannot tear or undo a
  write that returned: the bytes are in the kernel's page cache.  No
  ``fsync``: after a power loss the database is the truth again, and a
  message may go out twice (at least once, never lost);
* the database learns it afterwards, off the sending path: the worker marks
  the messages sent in batches (`lamsonfilter.outboxworker.OutboxWorker`), and a
  journal line whose database write failed is applied again
  (`OutboxStore.apply_sent`) before the worker claims anything more;
* a journal belongs to one process: its file is named after the database,
  the host and the process id (``sent-<db>-<host>-<pid>.log``) and is held
  with an exclusive ``flock`` while the process lives.  The kernel drops
  that lock when the process dies, however it dies; so a process takes a
  journal whose lock it can get for the journal of a dead process of its
  own host, applies it to the database and deletes it (`recover`) -- at
  start before its first claim, and then at least every quarter of the
  lease, so before any claim of the dead process expires.

The journal is local.  A host that dies and does not come back within
``OUTBOX_LEASE`` cannot tell the others what its journal holds: another
host takes the claims over and may send again what the dead host sent
between its ``250`` and its batch of "sent" (a second at most).  A host
that comes back first (or any process of it) applies its journals before
it claims.  Several processes on one host -- ``deq`` processes, the
milter, the content filter's sender -- each keep their own journal in the
one directory, and each applies the journals of the dead ones.

    journal = SentJournal("var/outbox-sent", database="sqlite:///var/state.db")
    journal.recover(storage)        # dead processes' journals -> the database
    journal.record(17, sent_token(raw), ["alice@example.org"])
    journal.applied([17])           # the database has it: the line may go

Errors: an unwritable directory raises `JournalError` (`OSError`) naming it
when the journal opens; a line that cannot be read (a torn last line after a
power loss) is skipped with a WARNING -- its message may go out twice.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

__all__ = ["JournalError", "SentJournal", "SentRecord", "SentSink", "read_journal", "sent_token"]

log = logging.getLogger("lamsonfilter.relay")

#: Own journal lines applied and the file past this size: it is emptied.
TRUNCATE_AT = 256 * 1024
#: Records per `apply_sent` call while recovering a journal.
APPLY_BATCH = 500


class JournalError(OSError):
    """The journal's directory or file cannot be made, opened or written."""


@dataclass(frozen=True)
class SentRecord:
    """One line of a journal: the relay accepted outbox message `id` (whose raw bytes
    have token `token`) for `done`, in one SMTP transaction."""

    id: int
    token: str
    done: tuple[str, ...]

    def line(self) -> bytes:
        return (json.dumps({"id": self.id, "token": self.token, "done": list(self.done)},
                           ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class SentSink(Protocol):
    """Where journal lines go (`lamsonfilter.state.OutboxStore.apply_sent`)."""

    def apply_sent(self, records: Sequence[SentRecord]) -> int:
        """Take `done` out of each message (marking it sent when nobody is left); returns
        how many records matched a pending message with the same token."""


def sent_token(raw: bytes) -> str:
    """What ties a journal line to the message it speaks of: a digest of its bytes."""
    return hashlib.sha256(raw).hexdigest()[:24]


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _host() -> str:
    """The host name, reduced to what a file name may hold."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def read_journal(path: str | Path) -> list[SentRecord]:
    """The records of a journal file; a line that does not read (torn, foreign) is skipped."""
    records: list[SentRecord] = []
    data = Path(path).read_bytes()
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            records.append(SentRecord(int(item["id"]), str(item["token"]),
                                      tuple(str(r) for r in item["done"])))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("outbox journal %s: line %d unreadable, skipped (its message may go out twice): %s",
                        path, n, exc)
    return records


class SentJournal:
    """One process's journal in `directory`, for the database named by `database`."""

    def __init__(self, directory: str | Path, database: str, *, host: str | None = None,
                 pid: int | None = None) -> None:
        self.directory = Path(directory)
        self.prefix = f"sent-{_tag(database)}-{host or _host()}-"
        self.path = self.directory / f"{self.prefix}{os.getpid() if pid is None else pid}.log"
        self._fd: int | None = None
        self._size = 0
        self._unapplied: dict[int, list[SentRecord]] = {}  # id -> its lines the database may lack
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SentJournal({self.path})"

    # ------------------------------------------------------------------ this process
    def open(self) -> None:
        """Create the directory and this process's file, and hold its lock (`JournalError`)."""
        if self._fd is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(exc.errno, f"outbox journal: cannot create {self.path}: {exc.strerror}; "
                                          "set OUTBOX_JOURNAL to a directory this process may write") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise JournalError(exc.errno, f"outbox journal {self.path} is held by another process "
                                          "(a second sender with this process id?)") from exc
        self._fd, self._size = fd, os.fstat(fd).st_size
        if self._size:  # a dead process's with this process id (reused): its lines are ours to apply
            for rec in read_journal(self.path):
                self._unapplied.setdefault(rec.id, []).append(rec)

    def record(self, id: int, token: str, done: Sequence[str]) -> None:
        """Append one line, with one ``os.write``: the relay accepted message `id` for `done`."""
        if not done:
            return
        rec = SentRecord(int(id), token, tuple(done))
        line = rec.line()
        with self._lock:
            if self._fd is None:
                self.open()
            assert self._fd is not None
            written = os.write(self._fd, line)
            if written != len(line):  # a full disk: what is there is a torn line, read as such
                raise JournalError(errno.ENOSPC, f"outbox journal {self.path}: short write")
            self._size += written
            self._unapplied.setdefault(rec.id, []).append(rec)

    def applied(self, ids: Iterable[int]) -> None:
        """The database has recorded these messages' sends: their lines are no longer needed."""
        with self._lock:
            for i in ids:
                self._unapplied.pop(int(i), None)
            if not self._unapplied and self._fd is not None and self._size > TRUNCATE_AT:
                os.ftruncate(self._fd, 0)  # O_APPEND: the next line goes at 0
                self._size = 0

    def unapplied(self) -> list[SentRecord]:
        """This process's lines whose database write has not been confirmed (it failed, or is due)."""
        with self._lock:
            return [r for recs in self._unapplied.values() for r in recs]

    def holds(self, id: int, token: str | None = None) -> bool:
        """Whether this process sent message `id` (with this token) and the database may not know."""
        with self._lock:
            return any(token in (None, r.token) for r in self._unapplied.get(int(id), ()))

    def note(self, id: int, token: str, done: Sequence[str]) -> None:
        """`record`, but a failure is logged, not raised: the relay has the message, and the
        database's "sent" that follows is then its only record (the outbox worker's way)."""
        try:
            self.record(id, token, done)
        except OSError as exc:
            log.error("outbox: message %d sent, but the sent journal failed (it may go out twice if "
                      "this process dies before the database records it): %s", id, exc)

    def before_claim(self, sink: SentSink, last_recovery: float, every: float) -> float:
        """What an outbox worker does before each claim: apply this process's lines the database
        lacks, and -- when `every` seconds passed since `last_recovery` (a `time.monotonic`; a
        quarter of the lease, so before any dead process's claim expires) -- the journals of
        this host's dead processes.  Returns the time of the last recovery; raises what the
        store raises (then the claim waits)."""
        if self.unapplied():
            self.reconcile(sink)
        now = time.monotonic()
        if now - last_recovery < every:
            return last_recovery
        self.recover(sink)
        return now

    def reconcile(self, sink: SentSink) -> int:
        """Apply this process's unconfirmed lines to the database (raises what the store raises)."""
        pending = self.unapplied()
        for start in range(0, len(pending), APPLY_BATCH):
            sink.apply_sent(pending[start : start + APPLY_BATCH])
        self.applied({r.id for r in pending})
        return len(pending)

    def close(self) -> None:
        """Release the file; delete it when the database has every line (a clean stop)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if not self._unapplied:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(fd)  # the lock goes with it

    # ------------------------------------------------------------------ dead processes
    def dead_journals(self) -> list[Path]:
        """Journals of this database and host that no living process holds (not this one's)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = self.directory / name
            if not name.startswith(self.prefix) or not name.endswith(".log") or (
                    path == self.path and self._fd is not None):
                continue
            found.append(path)
        return found

    def recover(self, sink: SentSink) -> int:
        """Apply the journals of this host's dead processes to the database, then delete them;
        returns how many lines were applied.  A journal still locked belongs to a living process."""
        applied = 0
        for path in self.dead_journals():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # another process recovered it meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                if os.fstat(fd).st_nlink == 0:
                    continue  # recovered and deleted while we waited for its lock
                records = read_journal(path)
                changed = sum(sink.apply_sent(records[start : start + APPLY_BATCH])
                              for start in range(0, len(records), APPLY_BATCH))
                os.unlink(path)
                applied += len(records)
                log.info("outbox journal: %d line(s) of a dead process's %s applied: %d message(s) sent "
                         "that the database did not know (not sent again)", len(records), path.name, changed)
            finally:
                os.close(fd)
        return applied
