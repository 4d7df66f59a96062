"""Prometheus metrics for every process: one registry and one HTTP endpoint per process.

Names follow Prometheus conventions: ``reliev3r_`` prefix, base units (seconds, bytes),
``_total`` on counters, bounded label sets (stage, reason, source: never a window id; the
streamer keeps the series of its most recent sources only, ``streamer.service.SOURCE_SERIES``).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

disable_created_metrics()  # the _created series doubles every counter for no use here

PREFIX = "reliev3r_"


class Metrics:
    """Factory of prefixed metrics on a private registry (so tests may build many)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.registry = CollectorRegistry()
        self.up = self.gauge("process_up", "1 while the process runs", ["stage"]).labels(stage)
        self.up.set(1)
        self.start_time = self.gauge("process_start_time_seconds", "Unix time the process started",
                                     ["stage"]).labels(stage)
        self.start_time.set(time.time())
        self.rejected = self.counter("messages_rejected_total",
                                     "Malformed or invalid messages rejected, by reason", ["stage", "reason"])
        self.server = None

    def counter(self, name: str, doc: str, labels: list[str] = ()) -> Counter:
        name = PREFIX + name
        if name.endswith("_total"):
            name = name[: -len("_total")]  # prometheus_client appends _total itself
        return Counter(name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: list[str] = (), buckets=Histogram.DEFAULT_BUCKETS) -> Histogram:
        return Histogram(PREFIX + name, doc, list(labels), registry=self.registry, buckets=buckets)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.stage, reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return the bound port (``port=0`` picks a free one)."""
        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
