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
==========================================  ==================================
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from .app import StartupError
from .decisions import Decision
from .state import StateStorage

__all__ = ["Metrics", "MetricsError"]

log = logging.getLogger("lamsonfilter")


class MetricsError(StartupError):
    """The metrics endpoint cannot start (library missing, address not loopback, port taken)."""


class Metrics:
    def __init__(self, storage: StateStorage | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise MetricsError("metrics need prometheus-client: pip install 'lamsonfilter[metrics]'") from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.storage = storage
        self.messages = prom.Counter("lamsonfilter_messages", "Messages processed, by decision",
                                     ["decision"], registry=self.registry)
        self.recipients = prom.Counter("lamsonfilter_recipients", "Recipients, by route and action",
                                       ["route", "action"], registry=self.registry)
        self.latency = prom.Histogram("lamsonfilter_processing_seconds", "Time in App.process",
                                      registry=self.registry,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.generated = prom.Counter("lamsonfilter_outbox_generated", "Outbox messages produced",
                                      registry=self.registry)
        self.errors = prom.Counter("lamsonfilter_errors", "Tempfails caused by errors", registry=self.registry)
        pending = prom.Gauge("lamsonfilter_outbox_pending", "Outbox messages committed but not yet sent",
                             registry=self.registry)
        pending.set_function(self._pending)
        self._server: Any = None

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
        if not allow_remote and not _loopback(host):
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
