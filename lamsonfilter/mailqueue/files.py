"""Files written to survive a crash: Maildir's unique names and the durable write.

Shared by the mail queue (`lamsonfilter.mailqueue.maildir`), the quarantine
and the poison counters::

    name = unique_name()                               # 1733480000.M123456P42Q7.host
    write_durably(tmp / name, new / name, lambda f: f.write(data))   # whole and on disk, or absent

`write_durably` raises the `OSError` of the step that failed and leaves no
temporary file behind.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["unique_name", "write_durably"]

_counter_lock = threading.Lock()
_counter = 0


def unique_name() -> str:
    """Maildir's unique name: time, pid and a counter, and the host name."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(";", "_")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{n}.{host}"


def write_durably(tmp: Path, final: Path, write: Callable[[BinaryIO], object], exclusive: bool = False,
                  sync: bool = True) -> None:
    """Write `tmp` with `write`, fsync it, rename it to `final`, fsync the directory: after
    this returns the file survives a crash or power loss; on failure `tmp` is removed.
    With `sync=False` the file is whole or absent after a process crash (the rename is
    atomic), but a power loss may lose it: no fsync."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if not sync:
        return
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
