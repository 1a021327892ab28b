"""Prometheus metrics of the ingest job (``--metrics-port``), read from the job's snapshot at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class IngestCollector:
    def __init__(self, job):
        self.job = job

    def collect(self):
        s = self.job.snapshot()
        for name, key, doc in (
            ("macstream_ingest_records", "records", "Kafka records consumed (incl. redeliveries)"),
            ("macstream_ingest_documents_written", "upserted", "Documents encoded and written to the store"),
            ("macstream_ingest_documents_unchanged", "unchanged", "Documents skipped: same content hash as stored"),
            ("macstream_ingest_documents_deleted", "deleted", "Documents deleted (delete op or tombstone)"),
            ("macstream_ingest_chunks_written", "chunks_written", "Modulations written"),
            ("macstream_ingest_consumer_restarts", "consumer_restarts", "Consumer actors replaced after dying"),
        ):
            yield CounterMetricFamily(name, doc, value=s[key])
        dlq = CounterMetricFamily("macstream_ingest_dead_lettered", "Messages sent to <topic>.dlq", labels=["kind"])
        for kind, n in sorted(s["dlq_by_kind"].items()):
            dlq.add_metric([kind], n)
        yield dlq
        off = GaugeMetricFamily("macstream_ingest_committed_offset", "Committed offset", labels=["topic", "partition"])
        for p, o in sorted(s["committed"].items()):
            off.add_metric([s["topic"], str(p)], o)
        yield off
        yield GaugeMetricFamily("macstream_ingest_docs_per_second", "Documents written per second since start",
                                value=s["docs_per_s"])
        if s["batch_latency_p50_s"] is not None:
            yield GaugeMetricFamily("macstream_ingest_batch_latency_p50_seconds",
                                    "Median poll-to-commit latency of recent batches", value=s["batch_latency_p50_s"])


def serve_metrics(job, port: int, host: str = "127.0.0.1"):
    """Expose the job's metrics on host:port (0 = any free port); return (server, bound port)."""
    registry = CollectorRegistry()
    registry.register(IngestCollector(job))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_address[1]
