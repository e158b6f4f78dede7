"""Unlinking finished queue files off the workers' path: two threads, a bounded backlog.

On ext4 an ``unlink`` that frees a file's blocks waits about 0.1 ms, more
than ``deq`` spends on the CPU for a message with an empty handler.  So a
worker finishes a message with one rename into ``done/``
(`MailQueue.done` with ``later``: from then on nothing runs it again, kill
-9 or not) and hands the path to the `Remover`, whose threads unlink it
while the worker takes the next message (an unlink mostly waits, with
Python's GIL released; two threads keep up when another process's writes
make it wait longer, as they do on a busy disk)::

    remover = Remover()
    queue.done(msg, later=remover.remove)   # rename now, unlink in the remover's thread
    ...
    remover.close()                         # the backlog unlinked, the threads ended

Memory and disk stay bounded: at most `BACKLOG` paths wait (a few hundred
bytes each); when the threads fall that far behind, `remove` unlinks in
the caller's thread, as without a remover.  A path that is gone already is
no error (``sweep_done`` of another process was first); any other
``OSError`` is logged once per path and the file stays in ``done/`` until
the next `MailQueue.sweep_done` -- it is finished either way.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

__all__ = ["BACKLOG", "THREADS", "Remover"]

log = logging.getLogger("lamsonfilter.queueworker")

#: The most finished files waiting for their unlink; past it the caller unlinks.
BACKLOG = 512
#: Threads that unlink.
THREADS = 2


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # still finished: left in done/ for the next sweep
        log.warning("cannot remove the finished queue file %s: %s", path, exc)


class Remover:
    """Threads that unlink the paths given to `remove` (thread-safe)."""

    def __init__(self, backlog: int = BACKLOG, threads: int = THREADS) -> None:
        self.backlog = backlog
        self.inline = 0        # unlinks done in the caller's thread (the backlog was full, or closed)
        self._paths: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"lamsonfilter-deq-remover-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def remove(self, path: str) -> None:
        """Unlink `path` soon, in the remover's thread (now, in this one, when it is behind)."""
        if self._closed or self._paths.qsize() >= self.backlog:
            self.inline += 1
            _unlink(path)
        else:
            self._paths.put(path)

    def close(self, timeout: float = 60.0) -> None:
        """Unlink the backlog and end the thread (at most `timeout` seconds; what is left
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
