"""Running ``lamsonfilter smtpproxy``: checking the configuration, listening, workers, signals.

    config = ProxyConfig(app_dir=Path("app"), workers=2)
    check_config(config)       # StartupError naming the problem (the CLI exits 2)
    run(config)                # until SIGTERM or SIGINT

One process serves every connection on one asyncio loop; the application
runs in a small thread pool so a slow database does not stall other
connections.  ``--workers N`` (N > 1) starts N such processes sharing the
port through ``SO_REUSEPORT`` (the kernel spreads connections over them);
the parent process then only supervises them (restarting one that dies),
serves the metrics summed over the workers (``METRICS``), and runs the
single outbox worker, which the workers wake with ``SIGUSR1`` after a
message that produced mail.  One outbox sender per state database
means an outbox message is never sent twice by two processes.

Start-up refuses, naming the problem: a listener off loopback without
``--allow-remote`` (whoever reaches it relays through the reinjection
listener), a reinjection address equal to the listening
one (a loop), a port already taken, bad settings or routes, and a state
database without the lamsonfilter schema (run ``lamsonfilter db init``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import replace
from typing import Callable

from ..app import StartupError
from ..daemon.endpoint import is_loopback
from ..daemon.metrics import MULTIPROC_ENV, Metrics, multiprocess_directory
from ..daemon.process import RELOAD_SIGNAL, WAKE_SIGNAL, Reloader, SignalActions
from ..daemon.runtime import Runtime
from ..daemon.service import Service
from .handler import ProxyConfig, ProxyHandler
from .policy import PolicyServer
from .postfix import describe, size_limit
from .reinjector import Reinjector
from .session import protocol_factory
from .spool import spool_directory

__all__ = ["check_config", "run", "is_loopback", "bind_socket", "build_runtime", "ProxyServer"]

log = logging.getLogger("lamsonfilter.smtpproxy")

#: Postfix's smtp_data_done_timeout: the per-message deadline must stay well below it.
POSTFIX_DATA_DONE_TIMEOUT = 600.0
#: How long a stopping process waits for messages in progress.
STOP_GRACE = 30.0


def check_config(config: ProxyConfig) -> None:
    """Raise `StartupError` for settings that cannot work (no application loaded yet)."""
    host, port = config.listen
    if not is_loopback(host) and not config.allow_remote:
        raise StartupError(
            f"--listen {host}:{port} is not a loopback address; whoever reaches the content filter "
            "can relay through the reinjection listener. Use 127.0.0.1, or add --allow-remote "
            "if a firewall protects it"
        )
    if config.policy is not None and not is_loopback(config.policy[0]) and not config.allow_remote:
        raise StartupError(f"--policy {config.policy[0]}:{config.policy[1]} is not a loopback address; "
                           "add --allow-remote if a firewall protects it")
    if config.policy is not None and config.policy in (config.listen, config.reinject):
        raise StartupError("--policy must be a port of its own")
    if config.listen == config.reinject:
        raise StartupError(f"--reinject {host}:{port} is the --listen address: mail would loop")
    if not 1 <= config.workers <= 64:
        raise StartupError(f"--workers {config.workers}: must be between 1 and 64")
    if not 1 <= config.deadline <= POSTFIX_DATA_DONE_TIMEOUT / 2:
        raise StartupError(
            f"--deadline {config.deadline:g}: must be between 1 and {POSTFIX_DATA_DONE_TIMEOUT / 2:g} "
            "seconds (Postfix waits 600 s for the reply to the final dot)"
        )
    if config.max_size < 1024:
        raise StartupError(f"--max-size {config.max_size}: too small (Postfix's default is 10240000)")
    try:
        spool_directory(config.spool_dir)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def with_postfix_size(config: ProxyConfig) -> ProxyConfig:
    """Announce at least Postfix's ``message_size_limit`` (--postfix-config): a smaller SIZE makes
    Postfix bounce mail it accepted (5.3.4).  Without --postfix-config, --max-size as given."""
    if config.postfix_config is None:
        return config
    limit = size_limit(config.postfix_config)
    if limit is None:
        log.warning("Postfix in %s has no message_size_limit (0): the filter announces SIZE %d; a larger "
                    "message is deferred (452 4.3.4), not bounced; raise --max-size if such mail is expected",
                    config.postfix_config, config.max_size)
        return config
    if limit > config.max_size:
        log.info("announcing SIZE %d: Postfix's message_size_limit in %s (above --max-size %d)",
                 limit, config.postfix_config, config.max_size)
        return replace(config, max_size=limit)
    return config


def build_runtime(config: ProxyConfig, outbox_interval: float = 30.0) -> Runtime:
    """The application (settings, routes, schema checked), with the outbox sent to --reinject."""
    host, port = config.reinject
    overrides = {"RELAY": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                 "DATABASE_URL": config.database, "QUEUE": config.queue}
    runtime = Runtime.from_directory(config.app_dir, overrides, outbox_interval=outbox_interval)
    if config.postfix_config is not None:
        _refuse_broken_postfix(config, runtime)
    try:
        quarantine = config.quarantine_path
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        from .quarantine import Quarantine

        Quarantine(quarantine).ensure()
    except OSError as exc:
        runtime.stop()
        raise StartupError(f"quarantine {config.quarantine_path}: {exc}") from None
    try:  # made here, before serving: the key every worker signs reinjected mail with
        from .looptrace import TraceKey

        TraceKey(config.attempts_path.parent / "trace.key")
    except OSError as exc:
        runtime.stop()
        raise StartupError(f"trace key in {config.attempts_path.parent}: {exc}") from None
    return runtime


def _refuse_broken_postfix(config: ProxyConfig, runtime: Runtime) -> None:
    """With --postfix-config, the errors `lamsonfilter check` would report stop the start
    (a reinjection listener that filters again loops mail; one that is missing loses it)."""
    from ..check import check_postfix

    errors = [f for f in check_postfix(str(config.postfix_config), runtime.app.settings) if f.severity == "error"]
    if errors:
        runtime.stop()
        raise StartupError(
            f"the Postfix configuration in {config.postfix_config} is not safe to run with: " + describe(errors))


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; StartupError naming the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def run(config: ProxyConfig) -> int:
    """Check, start, serve until a signal; returns the exit status."""
    check_config(config)
    config = with_postfix_size(config)
    if config.workers == 1:
        runtime = build_runtime(config)
        try:
            sock = bind_socket(*config.listen)
            policy = bind_socket(*config.policy) if config.policy else None
        except StartupError:
            runtime.stop()
            raise
        runtime.start()
        try:
            asyncio.run(_serve(config, runtime, sock, None, policy))
        finally:
            runtime.stop()
        return 0
    return _supervise(config)


class ProxyServer:
    """The SMTP server of one process on an asyncio loop (what tests start in a thread)."""

    def __init__(self, config: ProxyConfig, runtime: Runtime, sock: socket.socket,
                 on_outbox: Callable[[], None] | None = None, policy_sock: socket.socket | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.sock = sock
        self.policy_sock = policy_sock
        self._policy: asyncio.AbstractServer | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(config.threads, thread_name_prefix="lamsonfilter-app")
        self.reinjector = Reinjector(*config.reinject, helo=config.hostname,
                                     connect_timeout=min(30.0, config.deadline / 3))
        self.handler = ProxyHandler(runtime, self.reinjector, config, self.executor, on_outbox)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol_factory(self.handler), sock=self.sock)
        if self.policy_sock is not None:
            self._policy = await PolicyServer(self.runtime).start(self.policy_sock)

    async def stop(self) -> None:
        """Stop accepting, let messages in progress finish (bounded), close kept connections."""
        for server in (self._server, self._policy):
            if server is not None:
                server.close()
        deadline = time.monotonic() + min(STOP_GRACE, self.config.deadline)
        while self.handler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.reinjector.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _serve(config: ProxyConfig, runtime: Runtime, sock: socket.socket,
                 on_outbox: Callable[[], None] | None, policy_sock: socket.socket | None) -> None:
    """One process: the SMTP server on `sock` until SIGTERM/SIGINT; SIGHUP reloads the app."""
    loop = asyncio.get_running_loop()
    proxy = ProxyServer(config, runtime, sock, on_outbox, policy_sock)
    await proxy.start()
    stop = asyncio.Event()
    service = Service() if on_outbox is None else None  # workers: the parent talks to systemd
    last_tick = [time.monotonic()]

    mode = "LMTP" if config.lmtp else "SMTP"
    status = f"listening on {config.listen[0]}:{config.listen[1]} ({mode}), reinjecting to " \
             f"{config.reinject[0]}:{config.reinject[1]}"
    reloader = Reloader(runtime, service, recheck=lambda: _recheck_postfix(proxy), ok_status=status)
    SignalActions(stop=lambda name: stop.set(), reload=reloader.request).add_to_loop(loop)
    log.info("smtpproxy (pid %d) %s", os.getpid(), status)
    if service is not None:
        service.ready(status)
        service.start_watchdog(lambda: time.monotonic() - last_tick[0] < 10.0)
    while not stop.is_set():  # the watchdog's evidence that the loop is alive
        last_tick[0] = time.monotonic()
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    if service is not None:
        service.stopping()
    await proxy.stop()
    log.info("smtpproxy (pid %d) stopped", os.getpid())


def _recheck_postfix(proxy: ProxyServer) -> str:
    """At reload: the loop guard again (a `postfix reload` may have broken the set-up since the start).
    Logged, not fatal: mail that comes back is held (lamsonfilter.contentfilter.looptrace).  Returns the problem."""
    guard = proxy.handler.guard
    if guard is None:
        return ""
    try:
        errors = guard.refresh()
    except Exception as exc:  # noqa: BLE001 -- a reload never stops the filter
        log.error("reload: cannot check the Postfix configuration in %s: %s", guard.config_dir, exc)
        return str(exc)
    if not errors:
        log.info("reload: the Postfix configuration in %s passes the loop guard", guard.config_dir)
        return ""
    text = describe(errors)
    log.error("reload: the Postfix configuration in %s is not safe: %s", guard.config_dir, text)
    return text


# ---------------------------------------------------------------------- several workers
def _supervise(config: ProxyConfig) -> int:
    """Parent of N workers: starts them, restarts a dead one, runs the outbox, stops them all."""
    probe = build_runtime(config)  # fails here, before any fork, on bad settings or schema
    metrics_at = probe.app.settings.get("METRICS")
    want_metrics = bool(metrics_at)
    probe.stop()
    bind_socket(*config.listen, reuse_port=True).close()  # the port is free and ours
    if metrics_at:  # before any fork: a taken metrics port is one line, not N workers started and stopped
        from ..settings import parse_hostport

        host, port = parse_hostport(str(metrics_at))
        try:
            bind_socket(host, port).close()
        except StartupError as exc:  # worded as `Metrics.serve` words it
            reason = str(exc).split(": ", 1)[-1]
            raise StartupError(f"cannot listen on {host}:{port} for metrics: {reason} (METRICS)") from None
    if config.policy:
        bind_socket(*config.policy, reuse_port=True).close()
    # before prometheus-client is imported here or in a worker: the workers count into files there
    metrics_dir = multiprocess_directory() if want_metrics else None
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> worker index
    for index in range(config.workers):
        children[_fork_worker(config, index, parent)] = index
    runtime = build_runtime(config, outbox_interval=5.0)
    try:
        runtime.start()  # the metrics endpoint (a taken port fails here) and the outbox worker
    except BaseException:
        for pid in children:  # our own children only, by PID
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        runtime.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    stopping = False

    def on_stop(name: str) -> None:
        nonlocal stopping
        stopping = True

    def on_wake() -> None:
        if runtime.worker is not None:
            runtime.worker.wake()

    def on_reload() -> None:  # each worker reloads its own application
        for pid in children:
            os.kill(pid, RELOAD_SIGNAL)

    SignalActions(stop=on_stop, reload=on_reload, wake=on_wake).install()
    service = Service()
    service.ready(f"{config.workers} workers listening on {config.listen[0]}:{config.listen[1]}")
    service.start_watchdog()
    restarts: list[float] = []
    try:
        while not stopping and children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.2)
                continue
            if pid not in children:
                continue
            index = children.pop(pid)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 10:
                log.error("workers keep dying (%d restarts in a minute); stopping", len(restarts))
                return 1
            log.error("worker %d (pid %d) exited with status %d; starting it again", index, pid, status)
            children[_fork_worker(config, index, parent)] = index
    finally:
        service.stopping()
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + STOP_GRACE + 5
        while children and time.monotonic() < end:
            for pid in list(children):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        children.pop(pid)
                except ChildProcessError:
                    children.pop(pid)
            time.sleep(0.05)
        for pid in children:  # our own children only, by PID
            os.kill(pid, signal.SIGKILL)
        runtime.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _fork_worker(config: ProxyConfig, index: int, parent: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        SignalActions.reset()
        runtime = build_runtime(config)
        runtime.worker = None  # the parent sends the outbox
        if os.environ.get(MULTIPROC_ENV):  # the parent serves the metrics, summed over the workers
            runtime.metrics = Metrics(None, recording_only=True)

        def wake_parent() -> None:
            try:
                os.kill(parent, WAKE_SIGNAL)
            except ProcessLookupError:
                pass

        sock = bind_socket(*config.listen, reuse_port=True)
        policy = bind_socket(*config.policy, reuse_port=True) if config.policy else None
        try:
            asyncio.run(_serve(config, runtime, sock, wake_parent, policy))
        finally:
            runtime.stop()
    except BaseException as exc:  # noqa: BLE001 -- a child never returns into the parent's code
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            print(f"lamsonfilter: worker {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
