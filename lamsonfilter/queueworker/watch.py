"""Sleeping until mail arrives in the queue's ``new/``: inotify through ctypes, with a timer.

``deq`` sleeps while the queue is empty instead of listing the directory
over and over.  `NewMailWatch` asks the kernel (inotify(7)) to say when a
file is created in or moved into ``new/`` -- Postfix's Maildir delivery
links the file there from ``tmp/``, lamsonfilter renames it -- and `wait`
sleeps in ``select`` until that happens, `wake` is called (a stop, from
another thread), or the timeout passes::

    watch = NewMailWatch(Path("var/queue/new"))
    watch.drain()            # forget what happened before this scan
    ...scan new/...
    watch.wait(30.0)         # True: something arrived (or a wake), False: the time passed
    watch.close()

Where inotify is missing (not Linux, no more watches: ``fs.inotify.max_user_watches``)
or cannot see the change (another host writing to a shared directory), the
caller's timeout is the fallback: `wait` returns after at most `FALLBACK`
seconds without inotify, and the feeder never sleeps longer than its rescan
interval with it.  ``IN_Q_OVERFLOW`` (events lost) also wakes the caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
from pathlib import Path

__all__ = ["NewMailWatch", "FALLBACK"]

log = logging.getLogger("lamsonfilter.queueworker")

#: Without inotify, `wait` sleeps at most this long (seconds): a timed rescan, not a busy loop.
FALLBACK = 5.0

_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_ONLYDIR = 0x01000000


def _inotify_fd(directory: Path) -> int | None:
    """An inotify descriptor watching `directory` for new files, or None (the reason is logged)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError) as exc:
        log.info("no inotify here (%s): rescanning %s every %g s", exc, directory, FALLBACK)
        return None
    add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = int(init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        log.warning("inotify_init1: %s: rescanning %s every %g s", os.strerror(err), directory, FALLBACK)
        return None
    if add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        log.warning("inotify_add_watch %s: %s: rescanning every %g s", directory, os.strerror(err), FALLBACK)
        return None
    return fd


class NewMailWatch:
    """Wait for a new file in one directory, or a wake-up from another thread."""

    def __init__(self, directory: Path, use_inotify: bool = True) -> None:
        self.directory = directory
        self.fd = _inotify_fd(directory) if use_inotify else None
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def watching(self) -> bool:
        """True when inotify watches the directory (else `wait` is a timer)."""
        return self.fd is not None

    def wait(self, timeout: float) -> bool:
        """Sleep until a file arrives, `wake`, or `timeout` seconds (at most `FALLBACK` without inotify)."""
        fds = [self._r] if self.fd is None else [self.fd, self._r]
        if self.fd is None:
            timeout = min(timeout, FALLBACK)
        try:
            ready, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        except InterruptedError:  # pragma: no cover -- PEP 475 retries; kept for safety
            return True
        self.drain()
        return bool(ready)

    def drain(self) -> None:
        """Forget the events and wake-ups so far (called before a scan, which sees their files)."""
        for fd in (self.fd, self._r):
            if fd is None:
                continue
            try:
                while os.read(fd, 65536):
                    pass
            except BlockingIOError:
                pass

    def wake(self) -> None:
        """Make a `wait` return now (thread-safe)."""
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def close(self) -> None:
        for fd in (self.fd, self._r, self._w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = None
