"""Unlinking finished queue files off the workers' path: a child process, or threads where it cannot start.

On ext4 an ``unlink`` that frees a file's blocks waits about 0.1 ms (far
longer when other processes write to the disk), more than ``deq`` spends
on the CPU for a message with an empty handler.  So a worker finishes a
message with one rename into ``done/`` (`MailQueue.done` with ``later``:
from then on nothing runs it again, kill -9 or not) and hands the path to
a remover, which unlinks it while the worker takes the next message::

    remover = start_remover()                 # ChildRemover, or Remover (threads) if no child
    queue.done(msg, later=remover.remove)     # rename now, unlink soon, elsewhere
    ...
    remover.close()                           # the backlog unlinked

`ChildRemover` writes each path (NUL-ended) into a pipe to a small child
process -- the same interpreter, no site imports -- whose `THREADS`
threads unlink.  The worker's only cost is one ``write``; nothing in
deq's process competes with it for Python's GIL (threads in the process
did: each unlink's return wakes a thread that wants the lock the worker
holds; in interleaved runs they gave 2,600-5,800 msg/s, the child
4,900-8,600).  The backlog is bounded by the
pipe (64 KB, about 600 paths) and the child's own queue (`BACKLOG`): when
the child falls behind, ``write`` blocks and the workers wait, so memory
and the files in ``done/`` stay bounded.  If deq dies, the child reads the
end of the pipe, unlinks what it has and exits; what it had not read stays
in ``done/`` for the next `MailQueue.sweep_done`.  If the child dies, the
worker unlinks in its own thread from then on.

`Remover` is the same in threads of deq's own process (the fallback, and
what tests use): a full backlog makes the caller unlink.  A path that is
gone already is no error (a sweep was first); any other ``OSError`` leaves
the file, finished, in ``done/`` for the next sweep.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Protocol

__all__ = ["BACKLOG", "LOCAL_THREADS", "THREADS", "ChildRemover", "FileRemover", "Remover", "start_remover"]

log = logging.getLogger("lamsonfilter.queueworker")

#: The most finished files waiting for their unlink in a remover's own queue.
BACKLOG = 512
#: Threads that unlink in the child (unlinks mostly wait: on a busy disk four get through
#: three to four times as many per second as one), and in deq's process (`Remover`).
THREADS = 4
LOCAL_THREADS = 2

#: The child's program: read NUL-ended paths from stdin, unlink them in THREADS threads, end at
#: the end of the pipe (SIGTERM and SIGINT ignored: systemd's stop signals the whole unit, and the
#: child must outlive deq's last messages, whose files it removes).
_CHILD = f"""
import os, queue, signal, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
paths = queue.Queue({BACKLOG})
def unlink():
    while (path := paths.get()) is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"lamsonfilter deq remover: cannot remove {{path!r}}: {{exc}}", file=sys.stderr)
threads = [threading.Thread(target=unlink) for _ in range({THREADS})]
for t in threads:
    t.start()
rest = b""
while chunk := os.read(0, 65536):
    *names, rest = (rest + chunk).split(b"\\0")
    for name in names:
        paths.put(name)
for t in threads:
    paths.put(None)
for t in threads:
    t.join()
"""


class FileRemover(Protocol):
    """What the worker hands finished files to."""

    def remove(self, path: str) -> None: ...

    def close(self, timeout: float = 60.0) -> None: ...


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # still finished: left in done/ for the next sweep
        log.warning("cannot remove the finished queue file %s: %s", path, exc)


def start_remover() -> FileRemover:
    """A `ChildRemover`; a `Remover` (threads) when the child cannot be started (logged)."""
    try:
        return ChildRemover()
    except OSError as exc:
        log.warning("no remover process (%s): finished queue files are unlinked by threads of deq", exc)
        return Remover()


class ChildRemover:
    """Paths to a child process that unlinks them (`remove` is thread-safe)."""

    def __init__(self) -> None:
        # its own session: a Ctrl-C meant for deq leaves it to finish the pipe's end; it ends when
        # deq closes the pipe or dies (the kernel closes it then)
        # started once, at deq's start (never per message); the paths go through the pipe
        self._proc = subprocess.Popen(  # noqa: S603 -- argv list of fixed strings, no shell
            [sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True)
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        self._alive = True

    def remove(self, path: str) -> None:
        """Unlink `path` soon, in the child (now, here, if the child is gone)."""
        data = os.fsencode(path) + b"\0"
        if self._alive and len(data) <= select.PIPE_BUF:  # one atomic write, whole with several workers
            try:
                if os.write(self._fd, data) == len(data):
                    return
            except OSError as exc:  # BrokenPipeError: the child died
                self._alive = False
                log.warning("the remover process is gone (%s): unlinking finished files here", exc)
        _unlink(path)

    def close(self, timeout: float = 60.0) -> None:
        """End of the pipe: the child unlinks what it has and exits (waited for at most `timeout`).
        One log line says when the last finished file was unlinked.  Idempotent."""
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        self._alive = False
        started = time.monotonic()
        try:
            stdin.close()
        except OSError:
            pass
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the remover process is still unlinking after %g s; leaving it to finish", timeout)
            return
        if code != 0:  # it died earlier (logged then); what it had not unlinked waits in done/
            log.warning("the remover process ended with status %s", code)
            return
        log.info("finished queue files unlinked: the remover process ended %.3f s after the last was handed over",
                 time.monotonic() - started)


class Remover:
    """Threads of this process that unlink the paths given to `remove` (thread-safe)."""

    def __init__(self, backlog: int = BACKLOG, threads: int = LOCAL_THREADS) -> None:
        self.backlog = backlog
        self.inline = 0        # unlinks done in the caller's thread (the backlog was full, or closed)
        self._paths: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"lamsonfilter-deq-remover-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def remove(self, path: str) -> None:
        """Unlink `path` soon, in a remover thread (now, in this one, when they are behind)."""
        if self._closed or self._paths.qsize() >= self.backlog:
            self.inline += 1
            _unlink(path)
        else:
            self._paths.put(path)

    def close(self, timeout: float = 60.0) -> None:
        """Unlink the backlog and end the threads (at most `timeout` seconds; what is left
        then stays in ``done/`` for the next sweep)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._paths.put(None)
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(end - time.monotonic(), 0.0))

    def _run(self) -> None:
        while (path := self._paths.get()) is not None:
            _unlink(path)
