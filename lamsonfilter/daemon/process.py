"""What a daemon does around its protocol engine: the socket file, the TCP socket, signals, reload.

The signals mean the same to every lamsonfilter daemon, and that is said
once, here (`SignalActions`): SIGTERM and SIGINT stop, SIGHUP reloads the
application (`Reloader`: systemd hears ``RELOADING=1``, then ``READY=1``
with the outcome), SIGUSR1 wakes the outbox worker.  The content filter
installs them on its asyncio loop (`SignalActions.add_to_loop`), its
``--workers`` parent as plain handlers (`SignalActions.install`), and the
milter, whose libmilter takes signals in a thread of its own, through
`SignalWaiter`::

    prepare_unix_socket("/run/lamsonfilter/milter.sock")   # dir made, live socket refused
    ...libmilter opens the socket...
    open_to_group(path, "postfix")                         # 0660, group postfix
    set_listener_nodelay(8891)                             # inherited by accepted sockets
    with SignalWaiter() as signals:                        # handlers in the main thread
        ...start threads; an engine thread calls SignalWaiter.block_here() first...
        signals.wait(engine_alive, on_reload=reloader.request)

    SignalActions(stop=stopped.set, reload=Reloader(runtime, service).request).add_to_loop(loop)

How errors surface: a socket another process serves raises `SocketInUse`;
a group that cannot be given falls back to mode 0666 with a warning;
everything else is an `OSError` from the system call that failed.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import logging
import os
import select
import signal
import socket
import stat
import threading
from types import TracebackType
from typing import Any, Callable

__all__ = ["SocketInUse", "prepare_unix_socket", "open_to_group", "set_listener_nodelay",
           "STOP_SIGNALS", "RELOAD_SIGNAL", "WAKE_SIGNAL", "SignalActions", "SignalWaiter", "Reloader"]

log = logging.getLogger("lamsonfilter")


class SocketInUse(OSError):
    """Another process is serving the unix socket we were asked to listen on."""


def prepare_unix_socket(path: str) -> None:
    """Create the socket's directory (0755) and refuse a socket another process serves.

    A stale socket file (nobody answers) is left for the listener to
    replace; a live one raises `SocketInUse` instead of being stolen.
    """
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return
        raise SocketInUse(f"{path}: another process is already listening on this socket")


def open_to_group(path: str, group: str | None) -> str:
    """Let `group` (Postfix's smtpd runs as user postfix) connect: group-owned, mode 0660.

    If the group does not exist or cannot be given (not root, not a
    member), the socket is made 0666 and a warning says so.  Returns what
    was done, for the start-up log line.
    """
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
            return f"mode 0660, group {group}"
        except (KeyError, PermissionError) as exc:
            log.warning("cannot give %s to group %s (%s); making it 0666 so Postfix can connect", path, group, exc)
    os.chmod(path, 0o666)
    return "mode 0666"


def set_listener_nodelay(port: int) -> bool:
    """Set TCP_NODELAY on this process's listening TCP socket on `port`; True if found.

    Linux copies the option to every socket accepted from it.  For a
    listener opened by a C library that does not expose it (libmilter),
    the socket is found among the process's descriptors.  Call it before
    other threads open sockets.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return False
    done = False
    for name in names:
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done = True
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays the listener's
    return done


#: Stop: finish the messages in progress (bounded), flush the outbox, exit 0.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Reload the application (`Reloader`); the process and its connections stay.
RELOAD_SIGNAL = signal.SIGHUP
#: Wake the outbox worker (the content filter's workers tell their parent so).
WAKE_SIGNAL = signal.SIGUSR1


class SignalActions:
    """What each signal means, for every daemon: `stop` (with the signal's name), `reload`, `wake`.

    Calling it with a signal number logs the stop or the reload and acts;
    a daemon without an outbox of its own passes no `wake`.
    """

    def __init__(self, stop: Callable[[str], None], reload: Callable[[], None],
                 wake: Callable[[], None] | None = None) -> None:
        self.stop = stop
        self.reload = reload
        self.wake = wake

    @property
    def signals(self) -> tuple[int, ...]:
        return (*STOP_SIGNALS, RELOAD_SIGNAL) + ((WAKE_SIGNAL,) if self.wake is not None else ())

    def __call__(self, signum: int) -> None:
        if signum == RELOAD_SIGNAL:
            log.info("%s: reloading the application", signal.Signals(signum).name)
            self.reload()
        elif signum == WAKE_SIGNAL:
            if self.wake is not None:
                self.wake()
        elif signum in STOP_SIGNALS:
            name = signal.Signals(signum).name
            log.info("%s: stopping", name)
            self.stop(name)

    def add_to_loop(self, loop: Any) -> None:
        """Act on the signals from an asyncio loop (`loop.add_signal_handler`)."""
        for signum in self.signals:
            loop.add_signal_handler(signum, self, signum)

    def install(self) -> None:
        """Act on the signals from plain Python handlers (in the main thread)."""
        for signum in self.signals:
            signal.signal(signum, lambda num, frame: self(num))

    @staticmethod
    def reset() -> None:
        """Every signal a daemon handles back to its default (a forked worker, before its own set-up)."""
        for signum in (*STOP_SIGNALS, RELOAD_SIGNAL, WAKE_SIGNAL):
            signal.signal(signum, signal.SIG_DFL)


class SignalWaiter:
    """SIGTERM, SIGINT and SIGHUP, received by the main thread, never by a C library's thread.

    libmilter starts a signal thread of its own that calls ``sigwait()`` for
    all three and stops the milter at any of them.  A thread in
    ``sigwait`` is as eligible for a process-wide signal as any thread
    that does not block it, but Linux hands such a signal to the main
    thread first whenever the main thread does not block it.  So the main
    thread never blocks them: entering installs Python handlers that only
    record the signal (and wake `wait` through ``set_wakeup_fd``), and an
    engine thread calls `block_here` first thing, before its library
    starts threads of its own, so those inherit the block.  A signal that
    arrives before `wait` (during start-up) is kept and acted on there.
    Leaving restores the previous handlers; signals that arrived while
    stopping are dropped.
    """

    SIGNALS = frozenset({*STOP_SIGNALS, RELOAD_SIGNAL})

    def __init__(self) -> None:
        self._pending: collections.deque[int] = collections.deque()
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup = -1
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None

    def __enter__(self) -> SignalWaiter:
        self._reader, self._writer = socket.socketpair()
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(self._old_wakeup)
        for sock in (self._reader, self._writer):
            if sock is not None:
                sock.close()
        self._pending.clear()

    def _record(self, signum: int, frame: Any) -> None:
        self._pending.append(signum)

    @classmethod
    def block_here(cls) -> None:
        """Block the three signals in the calling thread (and the threads it starts from now on)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, cls.SIGNALS)

    def wait(self, alive: Callable[[], bool], on_reload: Callable[[], None]) -> str | None:
        """Until SIGTERM/SIGINT (returns its name) or `alive()` turns false (returns None).

        SIGHUP calls `on_reload` and goes on waiting.
        """
        assert self._reader is not None, "use SignalWaiter as a context manager"
        stopped: list[str] = []
        act = SignalActions(stop=stopped.append, reload=on_reload)
        while alive():
            if not self._pending:
                select.select([self._reader], [], [], 1.0)
                with contextlib.suppress(BlockingIOError):
                    while self._reader.recv(512):
                        pass
            while self._pending:
                act(self._pending.popleft())
                if stopped:
                    return stopped[0]
        return None


class Reloader:
    """`Runtime.reload` in a helper thread, so the caller (a signal handler) returns at once.

    Both daemons reload through it on SIGHUP.  A request during a reload asks
    for one more afterwards.  `recheck` (the content filter: is the Postfix
    set-up still safe?) runs after every reload and returns a warning or "";
    systemd hears ``RELOADING=1`` before and ``READY=1`` with the outcome after.
    """

    def __init__(self, runtime: Any, service: Any = None, recheck: Callable[[], str] | None = None,
                 ok_status: str = "reloaded") -> None:
        self.runtime = runtime
        self.service = service
        self.recheck = recheck
        self.ok_status = ok_status
        self._lock = threading.Lock()
        self._again = False
        self._busy = False

    def request(self) -> None:
        with self._lock:
            if self._busy:
                self._again = True
                return
            self._busy = True
        threading.Thread(target=self._run, name="lamsonfilter-reload", daemon=True).start()

    def _run(self) -> None:
        while True:
            if self.service is not None:
                self.service.reloading()
            problem = self.runtime.reload()
            warning = self.recheck() if self.recheck is not None else ""
            if self.service is not None:
                text = self.ok_status if problem is None else f"reload refused, old application kept: {problem}"
                self.service.reloaded(text + (f"; Postfix set-up UNSAFE: {warning}" if warning else ""))
            with self._lock:
                if not self._again:
                    self._busy = False
                    return
                self._again = False
