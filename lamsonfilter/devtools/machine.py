"""What the development tools ask of the machine: binaries, free loopback ports, waiting for a condition.

Shared by the private Postfix (`lamsonfilter.devtools.localpostfix`), the
demo and the test rigs:

    if missing_binaries("postfix", "postconf"): raise RigUnavailable(...)
    port = free_port()                            # 127.0.0.1, free a moment ago
    wait_for(lambda: port_accepts(port), 30, message="the listener")
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["RigUnavailable", "find_binary", "missing_binaries", "free_port", "port_accepts", "wait_for"]

T = TypeVar("T")

#: Where Debian puts the Postfix administrative commands (often not on a user's PATH).
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class RigUnavailable(RuntimeError):
    """The machine lacks something the rig needs (binaries, root)."""


def find_binary(name: str) -> str | None:
    """Path of ``name`` on PATH or in the usual sbin/bin directories, else None."""
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def missing_binaries(*names: str) -> list[str]:
    """The subset of ``names`` that :func:`find_binary` cannot find."""
    return [n for n in names if find_binary(n) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.1,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises :class:`TimeoutError` after ``timeout`` seconds.  ``message`` (or its result,
    if callable -- e.g. a maillog tail) goes into the error.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)
