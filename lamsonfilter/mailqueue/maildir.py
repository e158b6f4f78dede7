"""The mail queue: a Maildir that `lamsonfilter deq` works through, with claims.

Postfix (virtual(8) or local(8) Maildir delivery) or lamsonfilter itself
(``ctx.defer()``) writes one file per message and recipient into ``new/``;
the envelope is the file's first lines, as Postfix writes them::

    Return-Path: <alice@example.com>        the envelope sender (<> for the null sender)
    X-Original-To: python@lists.example.org (optional: the address as first given)
    Delivered-To: python@lists.example.org  the recipient

A worker **claims** a message by renaming it into ``claimed/`` (one rename:
of two workers, also on two hosts sharing the directory, exactly one wins)
and removes it only after its decision committed (`MailQueue.done`).  A
claim carries its end in the file name; a claim whose worker died is taken
back after that (`MailQueue.release_due`) and counts as an attempt.  A
message that ended in a temporary failure waits in ``retry/`` until its
time.  The file name's first part (before ``;``) never changes: it is the
message's queue id and, for the runtime, its replay key.

    q = MailQueue("/var/spool/lamsonfilter/queue", lease=300)
    q.put(raw, "alice@example.com", "python@lists.example.org")   # durable when it returns
    for name in q.scan():
        msg = q.claim(name)          # None: another worker took it
        ...                          # run the application on msg.sender, msg.recipient, msg.raw
        q.done(msg)                  # or q.retry(msg, delay=60)

A finished message can also leave in two steps, for speed (`done` with
``later``): one rename into ``done/`` -- as atomic as the unlink, and after
it nothing ever runs the file again: no folder a worker claims from holds
it -- then the unlink, off the worker's path (on ext4 an unlink that frees
the file's blocks waits about 0.1 ms; a rename does not).  What a process
that died left in ``done/`` is unlinked by the next `sweep_done`.

`claim` raises `EnvelopeMissing` for a file without a readable envelope
(its caller moves it aside; the envelope is never guessed from ``To:``).
Any other `OSError` propagates.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .envelope import ENVELOPE_MAX, EnvelopeMissing, parse_envelope
from .files import unique_name, write_durably

__all__ = ["MailQueue", "QueuedMessage", "QueueEntry", "EnvelopeMissing", "QueueError", "STATES", "open_regular",
           "parse_envelope", "taken_back", "unique_name", "write_durably"]

#: The queue's folders, in the order a message goes through them.
STATES = ("new", "claimed", "retry")
#: Names the operator commands accept: Maildir's characters plus our ``;k=v`` fields.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._,:=\\;+-]*\Z")


class QueueError(Exception):
    """A queued message that does not exist or cannot be acted on (the text says which)."""


@dataclass(frozen=True)
class QueuedMessage:
    """A claimed message: its envelope, the message bytes (envelope lines removed)."""

    name: str          # the stable first part of the file name: queue id and replay key
    file: str          # the claimed file's path (a str: no path object built per message)
    sender: str        # "" for the null sender
    recipient: str
    raw: bytes
    attempts: int      # earlier attempts that ended without a decision
    until: float       # the claim's end (time.time())

    @property
    def path(self) -> Path:
        """The claimed file."""
        return Path(self.file)


@dataclass(frozen=True)
class QueueEntry:
    """One file of the queue as the operator commands list it."""

    name: str
    state: str         # new, claimed, retry
    path: Path
    attempts: int
    size: int
    mtime: float
    due: float | None  # retry: when; claimed: the claim's end
    owner: str | None  # claimed: host.pid of the worker


def _fields(filename: str) -> tuple[str, dict[str, str]]:
    base, *rest = filename.split(";")
    return base, dict(part.partition("=")[::2] for part in rest)


def _filename(base: str, **fields: object) -> str:
    return ";".join([base, *(f"{k}={v}" for k, v in fields.items() if v not in (None, "", 0))])


class MailQueue:
    """A Maildir queue with ``claimed/`` and ``retry/`` beside ``tmp/``, ``new/``, ``cur/``."""

    def __init__(self, path: str | Path, lease: float = 300.0) -> None:
        self.path = Path(path)
        self.lease = lease
        # the two folders every message passes through, as strings: `claim` runs once per
        # message and os.path on str costs a fraction of pathlib's joins
        self._new = os.path.join(self.path, "new")
        self._claimed = os.path.join(self.path, "claimed")
        self._done = os.path.join(self.path, "done")
        host = socket.gethostname().replace("/", "_").replace(";", "_").replace("=", "_")
        self.owner = f"{host}.{os.getpid()}"

    def __repr__(self) -> str:
        return f"MailQueue({str(self.path)!r})"

    def ensure(self) -> None:
        """Create the folders (mode 0700 when new); raise OSError naming the problem."""
        for sub in ("tmp", "new", "cur", "claimed", "retry", "done"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.path / "new", os.W_OK):
            raise PermissionError(f"queue {self.path} is not writable")

    # ------------------------------------------------------------------ writing
    def put(self, raw: bytes, sender: str, recipient: str, name: str | None = None) -> str:
        """Queue one message for one recipient; durable (file and folder fsynced) when it
        returns.  A `name` the queue already holds (`holds`) is left alone (an idempotent retry)."""
        self.ensure()
        base = name or unique_name()
        if not _NAME.match(base) or ";" in base:
            raise QueueError(f"{base!r} is not a usable queue file name")
        for ch in "\r\n<>":
            if ch in sender or ch in recipient:
                raise QueueError(f"envelope address with {ch!r} cannot be queued")
        eol = b"\r\n" if raw.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
        head = b"Return-Path: <" + sender.encode("utf-8") + b">" + eol
        head += b"Delivered-To: " + recipient.encode("utf-8") + eol
        final = self.path / "new" / base
        if name is not None and self.holds(base):
            return base

        def write(f: BinaryIO) -> None:
            f.write(head)
            f.write(raw)

        write_durably(self.path / "tmp" / base, final, write, exclusive=True)
        return base

    def holds(self, base: str) -> bool:
        """True when a message named `base` waits in ``new/``, is claimed or waits for a retry.

        Looks up ``new/base`` first, then reads ``claimed/`` and ``retry/`` and, for a
        message given back after an attempt (``base;n=1``), ``new/``."""
        if (self.path / "new" / base).exists():
            return True
        prefix = base + ";"
        for sub in ("claimed", "retry", "new"):
            try:
                with os.scandir(self.path / sub) as it:
                    if any(e.name.startswith(prefix) for e in it):
                        return True
            except FileNotFoundError:
                continue
        return False

    # ------------------------------------------------------------------ working
    def scan(self) -> Iterator[str]:
        """The file names in ``new/``, lazily (memory stays small however long the queue)."""
        try:
            with os.scandir(self.path / "new") as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        yield entry.name
        except FileNotFoundError:
            return

    def claim(self, filename: str, now: float | None = None) -> QueuedMessage | None:
        """Take ``new/filename`` for this worker until now + lease; None if another took it."""
        now = time.time() if now is None else now
        base, fields = _fields(filename)
        attempts = int(fields.get("n", "0") or 0)
        until = now + self.lease
        # names from `scan` have no "/": plain string joins (os.path.join costs more, per message)
        target = f"{self._claimed}/{_filename(base, n=attempts, until=f'{until:.0f}', by=self.owner)}"
        try:
            os.rename(f"{self._new}/{filename}", target)
        except FileNotFoundError:
            return None
        data = _read(target)
        sender, recipient, start = parse_envelope(base, target, data)
        return QueuedMessage(base, target, sender, recipient, data[start:], attempts, until)

    def done(self, msg: QueuedMessage, later: Callable[[str], object] | None = None) -> bool:
        """The message's decision committed: remove it.  False if the claim was taken back
        meanwhile (a worker past its lease; the one that took it over replays the decision).

        With `later`, the file is renamed into ``done/`` (never claimed again from there,
        even if the process dies now) and ``later(path)`` unlinks it off the caller's path
        (`lamsonfilter.queueworker.remover`)."""
        if later is not None:
            finished = f"{self._done}/{msg.file.rpartition('/')[2]}"
            try:
                os.rename(msg.file, finished)
            except FileNotFoundError:
                pass  # the claim was taken back, or there is no done/ (a queue made before it)
            else:
                later(finished)
                return True
        try:
            os.unlink(msg.file)
        except FileNotFoundError:
            return False
        return True

    def sweep_done(self) -> int:
        """Unlink what is left in ``done/`` (finished messages a process that died had not
        removed yet); returns how many.  Safe while workers run: they only add to it."""
        removed = 0
        try:
            with os.scandir(self._done) as it:
                names = [e.name for e in it]
        except FileNotFoundError:
            return 0
        for filename in names:
            try:
                os.unlink(os.path.join(self._done, filename))
                removed += 1
            except FileNotFoundError:
                pass  # its own remover was first
        return removed

    def retry(self, msg: QueuedMessage, delay: float, now: float | None = None, count: bool = True) -> bool:
        """Give the message back for a later attempt (one more counted, unless `count` is False:
        the message was not at fault); False if no longer ours."""
        now = time.time() if now is None else now
        attempts = msg.attempts + (1 if count else 0)
        target = self.path / "retry" / _filename(msg.name, n=attempts, after=f"{now + delay:.0f}")
        try:
            os.rename(msg.file, target)
        except FileNotFoundError:
            return False
        return True

    def release_due(self, now: float | None = None, grace: float = 5.0) -> int:
        """Move retries whose time came, and claims `grace` seconds past their end (their
        worker died: one more attempt counted, and the name marked ``died=1``: `taken_back`),
        back to ``new/``.  Returns how many."""
        now = time.time() if now is None else now
        moved = 0
        for sub, field, extra in (("retry", "after", 0), ("claimed", "until", 1)):
            try:
                with os.scandir(self.path / sub) as it:
                    names = [e.name for e in it]
            except FileNotFoundError:
                continue
            for filename in names:
                base, fields = _fields(filename)
                try:
                    end = float(fields.get(field, "0"))
                except ValueError:
                    end = 0.0
                if end + (grace if extra else 0) > now:
                    continue
                attempts = int(fields.get("n", "0") or 0) + extra
                # a dead claim comes back marked (`taken_back`): deq runs it alone
                target = _filename(base, n=attempts, died=extra)
                try:
                    os.rename(self.path / sub / filename, self.path / "new" / target)
                    moved += 1
                except FileNotFoundError:
                    pass  # another worker moved it first
        return moved

    # ------------------------------------------------------------------ the operator's view
    def entries(self, states: tuple[str, ...] = STATES) -> Iterator[QueueEntry]:
        """Every file in the given folders (unsorted; read lazily)."""
        for sub in states:
            try:
                it = os.scandir(self.path / sub)
            except FileNotFoundError:
                continue
            with it:
                yield from self._entries_of(sub, (e.name for e in it))

    def _entries_of(self, sub: str, filenames: Iterable[str]) -> Iterator[QueueEntry]:
        for filename in filenames:
            if filename.startswith("."):
                continue
            base, fields = _fields(filename)
            path = self.path / sub / filename
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            due = fields.get("after") or fields.get("until")
            try:
                attempts, when = int(fields.get("n", "0") or 0), float(due) if due else None
            except ValueError:
                attempts, when = 0, None  # a name not ours: shown, never trusted
            yield QueueEntry(base, sub, path, attempts, st.st_size, st.st_mtime, when, fields.get("by"))

    def count(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for sub in STATES:
            try:
                with os.scandir(self.path / sub) as it:
                    counts[sub] = sum(1 for e in it if not e.name.startswith("."))
            except FileNotFoundError:
                pass
        return counts

    def find(self, name: str) -> QueueEntry:
        """The entry of the message `name` (the file name's part before ``;``), in any folder."""
        if not _NAME.match(name) or ";" in name:
            raise QueueError(f"{name!r} is not the name of a queued message")
        for sub in STATES:
            try:
                it = os.scandir(self.path / sub)
            except FileNotFoundError:
                continue
            with it:
                found = [e.name for e in it if e.name == name or e.name.startswith(name + ";")]
            for filename in found:
                for entry in self._entries_of(sub, [filename]):
                    return entry
        raise QueueError(f"no message {name} in the queue {self.path}")

    def envelope(self, entry: QueueEntry) -> tuple[str, str] | None:
        """(sender, recipient) from the first lines of `entry`'s file (at most 4 KB read);
        None when it has no readable envelope, is not a regular file, or moved meanwhile."""
        try:
            with open_regular(entry.path) as f:
                data = f.read(ENVELOPE_MAX)
            sender, recipient, _ = parse_envelope(entry.name, entry.path, data)
        except (OSError, QueueError, EnvelopeMissing):
            return None
        return sender, recipient

    def read(self, name: str) -> tuple[QueueEntry, str | None, str | None, bytes]:
        """One message for ``queue show``: its entry, sender and recipient (None when
        unreadable) and the message bytes."""
        entry = self.find(name)
        with open_regular(entry.path) as f:
            data = f.read()
        try:
            sender, recipient, start = parse_envelope(name, entry.path, data)
        except EnvelopeMissing:
            return entry, None, None, data
        return entry, sender, recipient, data[start:]

    def requeue(self, name: str) -> QueueEntry:
        """Move a waiting retry back to ``new/`` now (a claimed message only once its claim ended)."""
        entry = self.find(name)
        if entry.state == "new":
            return entry
        if entry.state == "claimed" and (entry.due or 0) > time.time():
            raise QueueError(f"{name} is being processed by {entry.owner} until "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.due))}")
        target = self.path / "new" / _filename(name, n=entry.attempts)
        try:
            os.rename(entry.path, target)
        except FileNotFoundError:
            raise QueueError(f"{name} moved while being requeued; look again") from None
        return self.find(name)

    def remove(self, name: str) -> QueueEntry:
        """Delete a message for good (not one that is being processed)."""
        entry = self.find(name)
        if entry.state == "claimed" and (entry.due or 0) > time.time():
            raise QueueError(f"{name} is being processed by {entry.owner}; try again after its claim ends")
        try:
            entry.path.unlink()
        except FileNotFoundError:
            raise QueueError(f"{name} moved while being removed; look again") from None
        return entry


def taken_back(filename: str) -> bool:
    """Whether a file name in ``new/`` is a claim taken back from a worker that died
    (`MailQueue.release_due`): the message may be what killed it."""
    return ";died=" in filename and _fields(filename)[1].get("died") == "1"


def _read(path: str) -> bytes:
    """The whole file: open, read to the end, close; nothing else (no fstat, no buffer object)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (not a link, FIFO or device: a
    queue directory's hostile entry never blocks or redirects a reader); QueueError if not."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QueueError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
