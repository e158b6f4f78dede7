"""Where a daemon listens: socket specifications and the loopback rule.

Every lamsonfilter listener binds to loopback or a Unix socket unless the
operator explicitly asks for more (whoever reaches the
milter or the filter port can make Postfix relay mail).  This module parses
the milter's ``--socket`` argument, in libmilter's own syntax::

    >>> parse_milter_socket("unix:/run/lamsonfilter/milter.sock")
    MilterSocket(kind='unix', path='/run/lamsonfilter/milter.sock', host='', port=0)
    >>> parse_milter_socket("inet:8891@127.0.0.1").postfix
    'inet:127.0.0.1:8891'
    >>> parse_milter_socket("inet:8891@192.0.2.1")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    lamsonfilter.daemon.endpoint.EndpointError: inet:8891@192.0.2.1: 192.0.2.1 is not a loopback address; ...

A spec that cannot be parsed, or a non-loopback address without
``allow_remote``, raises `EndpointError` with a message that names the spec
and says what to write instead.  Pure data: nothing here opens a socket.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["EndpointError", "MilterSocket", "parse_milter_socket", "is_loopback", "DEFAULT_MILTER_SOCKET"]

#: Where ``lamsonfilter milter`` listens when no ``--socket`` is given.
DEFAULT_MILTER_SOCKET = "unix:/run/lamsonfilter/milter.sock"

#: ``sun_path`` holds 108 bytes including the terminating NUL (Linux).
MAX_UNIX_PATH = 107


class EndpointError(ValueError):
    """A listening address that is malformed or not allowed."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ``::1`` and ``localhost`` (no DNS lookup is made)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MilterSocket:
    """A parsed milter socket: ``unix`` with a path, or ``inet``/``inet6`` with host and port."""

    kind: str  # "unix" | "inet" | "inet6"
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def libmilter(self) -> str:
        """The spec in libmilter's syntax (what ``smfi_setconn`` takes)."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{self.kind}:{self.port}@{self.host}"

    @property
    def postfix(self) -> str:
        """The same endpoint as Postfix's ``smtpd_milters`` wants it.

        For a chrooted smtpd a unix path must be written relative to the
        queue directory instead (see conf/postfix/main.cf.milter).
        """
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.kind == "inet6" else self.host
        return f"inet:{host}:{self.port}"

    def __str__(self) -> str:
        return self.libmilter


_INET = re.compile(r"(?P<kind>inet6?):(?P<port>\d+)(?:@(?P<host>\[?[^@\s\]]+\]?))?")


def parse_milter_socket(spec: str, *, allow_remote: bool = False) -> MilterSocket:
    """Parse ``unix:/path`` (also ``local:``), ``inet:PORT[@HOST]`` or ``inet6:PORT[@HOST]``.

    A missing host means loopback (127.0.0.1 or ::1).  A host that is not a
    loopback address is refused unless `allow_remote` is true.
    """
    spec = spec.strip()
    if spec.startswith(("unix:", "local:")):
        path = spec.split(":", 1)[1]
        if not path.startswith("/"):
            raise EndpointError(f"{spec}: a unix socket path must be absolute, e.g. {DEFAULT_MILTER_SOCKET}")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise EndpointError(f"{spec}: the path is longer than {MAX_UNIX_PATH} bytes (sun_path limit)")
        return MilterSocket("unix", path=path)
    m = _INET.fullmatch(spec)
    if m is None:
        raise EndpointError(
            f"{spec!r}: expected unix:/path, inet:PORT@HOST or inet6:PORT@HOST "
            "(libmilter syntax, e.g. inet:8891@127.0.0.1)"
        )
    kind, port = m.group("kind"), int(m.group("port"))
    host = (m.group("host") or ("::1" if kind == "inet6" else "127.0.0.1")).strip("[]")
    if not 0 < port < 65536:
        raise EndpointError(f"{spec}: port {port} is out of range")
    if not allow_remote and not is_loopback(host):
        raise EndpointError(
            f"{spec}: {host} is not a loopback address; the milter would accept connections "
            "from other hosts. Use inet:PORT@127.0.0.1 or a unix socket, or pass --allow-remote "
            "if this is really wanted (and firewall the port)"
        )
    return MilterSocket(kind, host=host, port=port)
