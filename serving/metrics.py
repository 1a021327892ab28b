"""Prometheus metrics of the HTTP API (``GET /metrics``): latency by endpoint and mode, stage times, batch sizes,
errors by status."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("macstream_request_seconds", "End-to-end request latency in the gateway",
                                 ["endpoint", "mode"], buckets=_LATENCY, registry=self.registry)
        self.stage = Histogram("macstream_stage_seconds",
                               "Per-question time in each stage (retrieve/aggregate/generate)",
                               ["stage"], buckets=_LATENCY, registry=self.registry)
        self.batch = Histogram("macstream_batch_size", "Requests answered together by one replica",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.errors = Counter("macstream_request_errors", "Requests answered with an error, by status",
                              ["status"], registry=self.registry)

    def observe(self, endpoint: str, mode: str, seconds: float, timings: dict | None, batch_size: int) -> None:
        self.latency.labels(endpoint, mode).observe(seconds)
        for stage, s in (timings or {}).items():
            self.stage.labels(stage).observe(s)
        self.batch.observe(batch_size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
