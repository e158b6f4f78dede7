"""Prometheus metrics: messages by route and decision, processing latency, outbox size.

    metrics = Metrics(storage)
    metrics.serve("127.0.0.1", 9125)           # text endpoint on loopback
    metrics.observe(decision, seconds)         # Runtime.process does this

Exposed (prometheus-client, one registry per daemon):

==========================================  ==================================
``lamsonfilter_messages_total``             messages, by ``decision`` kind
``lamsonfilter_recipients_total``           recipients, by ``route`` and
                                            ``action`` (route ``none`` for
                                            unrouted)
``lamsonfilter_processing_seconds``         histogram of ``App.process`` time
``lamsonfilter_outbox_generated_total``     messages the handlers produced
``lamsonfilter_outbox_pending``             committed, not yet sent (read
                                            from the state store per scrape)
``lamsonfilter_errors_total``               tempfails caused by errors
``lamsonfilter_reinjection_failures_total`` content filter: 451s because the
                                            reinjection listener did not take
                                            the message
``lamsonfilter_loops_total``                content filter: messages it had
                                            reinjected that came back to it
                                            (answered 451, not processed again)
==========================================  ==================================

With ``smtpproxy --workers N`` the messages are processed in N worker
processes while the parent serves the endpoint: the parent sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before it forks
(`multiprocess_directory`), each worker records into it
(``Metrics(recording_only=True)``), and the parent's endpoint adds them
up with prometheus-client's ``MultiProcessCollector`` -- counts survive a
worker that dies and is started again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Iterator

from ..app import StartupError
from ..decisions import Decision
from ..state import StateStorage
from .endpoint import is_loopback

__all__ = ["Metrics", "MetricsError", "MULTIPROC_ENV", "multiprocess_directory"]

log = logging.getLogger("lamsonfilter")


class MetricsError(StartupError):
    """The metrics endpoint cannot start (library missing, address not loopback, port taken)."""


#: prometheus-client's switch to multiprocess mode (read when it is first imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_directory() -> str:
    """Create an empty directory for the workers' metric files and export it in `MULTIPROC_ENV`.

    Call it before prometheus-client is imported and before forking; the
    caller removes the directory when the workers are gone.
    """
    path = tempfile.mkdtemp(prefix="lamsonfilter-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


class Metrics:
    """The metrics of one daemon.  `recording_only`: a worker process that counts into
    `MULTIPROC_ENV`'s directory and serves nothing (its parent serves the sum)."""

    def __init__(self, storage: StateStorage | None = None, *, recording_only: bool = False) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise MetricsError("metrics need prometheus-client: pip install 'lamsonfilter[metrics]'") from exc
        self._prom = prom
        self.storage = storage
        self._multiproc_dir = os.environ.get(MULTIPROC_ENV)
        if recording_only and not self._multiproc_dir:
            raise MetricsError(f"a recording-only metrics process needs {MULTIPROC_ENV}")
        # what this process counts; served directly unless the counts of several processes are summed
        self._own = prom.CollectorRegistry()
        self.registry = self._served_registry()
        self.messages = prom.Counter("lamsonfilter_messages", "Messages processed, by decision",
                                     ["decision"], registry=self._own)
        self.recipients = prom.Counter("lamsonfilter_recipients", "Recipients, by route and action",
                                       ["route", "action"], registry=self._own)
        self.latency = prom.Histogram("lamsonfilter_processing_seconds", "Time in App.process",
                                      registry=self._own,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.generated = prom.Counter("lamsonfilter_outbox_generated", "Outbox messages produced",
                                      registry=self._own)
        self.errors = prom.Counter("lamsonfilter_errors", "Tempfails caused by errors", registry=self._own)
        self.reinjection_failures = prom.Counter(
            "lamsonfilter_reinjection_failures", "451s because the reinjection listener did not take the message",
            registry=self._own)
        self.loops = prom.Counter("lamsonfilter_loops", "Reinjected messages that came back to the filter",
                                  registry=self._own)
        self._server: Any = None

    def _served_registry(self) -> Any:
        """The registry the endpoint serves: this process's counts, or the sum over the workers'
        files; plus the outbox gauge, read from the state store at each scrape."""
        if self._multiproc_dir:
            from prometheus_client import multiprocess

            registry = self._prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiproc_dir)  # type: ignore[no-untyped-call]
        else:
            registry = self._own
        registry.register(_PendingOutbox(self))
        return registry

    def _pending(self) -> float:
        if self.storage is None:
            return 0.0
        try:
            return float(len(self.storage.pending_outbox(100_000)))
        except Exception:  # noqa: BLE001 -- a scrape must not fail because the store is down
            return float("nan")

    def observe(self, decision: Decision, seconds: float) -> None:
        self.messages.labels(decision.kind).inc()
        for o in decision.outcomes:
            self.recipients.labels(o.route or "none", o.action.value).inc()
        self.latency.observe(seconds)
        self.generated.inc(len(decision.outbox))
        if decision.error:
            self.errors.inc()

    def render(self) -> bytes:
        """The text exposition format (what the endpoint serves)."""
        data: bytes = self._prom.generate_latest(self.registry)
        return data

    def serve(self, host: str, port: int, allow_remote: bool = False) -> None:
        if not allow_remote and not is_loopback(host):
            raise MetricsError(f"metrics address {host} is not loopback; use --allow-remote to expose it")
        try:
            self._server = self._prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot listen on {host}:{port} for metrics: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            server = self._server[0] if isinstance(self._server, tuple) else self._server
            server.shutdown()
            server.server_close()
            self._server = None


class _PendingOutbox:
    """``lamsonfilter_outbox_pending``: a gauge read from the state store when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("lamsonfilter_outbox_pending", "Outbox messages committed but not yet sent",
                                value=self.metrics._pending())
