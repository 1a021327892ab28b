"""``macstream bench ingest``: documents per second through the whole ingest path, by number of encoder workers.

How it is measured (printed with the results): a local Tansu broker (memory storage); the synthetic test split
produced once to a topic of 4 partitions; for each worker count, a fresh consumer group and a fresh embedded store
ingest the whole topic in backfill mode. docs/s = documents written / seconds from the job's first poll to the last
commit (model loading and the idle wait excluded). Each run starts a fresh Ray cluster sized to this machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.machine import machine
from pipeline.cluster import init_ray
from pipeline.config import IngestConfig
from pipeline.data.synthetic import generate
from workers import kafka_io
from workers.broker import LocalBroker
from workers.ingest import IngestJob


def run(checkpoint: str | None = None, entities: int = 40, workers: tuple[int, ...] = (1, 2),
        batch_size: int = 16) -> dict:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    docs = sorted(generate("test", entities, seed=0)[0], key=lambda d: (d.published_at, d.id))
    out: dict = {"runs": []}
    with LocalBroker() as broker:
        kafka_io.ensure_topic(broker.bootstrap, "bench", 4)
        kafka_io.produce(broker.bootstrap, "bench", docs)
        for n in workers:
            init_ray()
            store = tempfile.mkdtemp(prefix="macstream-bench-ingest-")
            cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic="bench",
                               group_id=f"bench-{n}-{time.time_ns()}", workers=n, store=str(Path(store) / "store"),
                               checkpoint=checkpoint, exit_when_idle=3.0, batch_size=batch_size)
            job = IngestJob(cfg, progress=False).start()
            first = last = None
            while True:
                job.supervise()
                snap = job.snapshot()
                now = time.monotonic()
                if snap["records"] and first is None:
                    first = now
                if snap["upserted"] >= len(docs) and last is None:
                    last = now
                if job.idle():
                    break
                time.sleep(0.1)
            snap = job.stop()
            ray.shutdown()
            secs = (last or time.monotonic()) - (first or job.started)
            out["runs"].append({"workers": n, "documents": snap["upserted"], "seconds": secs,
                                "docs_per_s": snap["upserted"] / secs if secs else None,
                                "batch_latency_p50_s": snap["batch_latency_p50_s"]})
    out["how"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                  "machine": machine(), "checkpoint": checkpoint or "shipped",
                  "documents": len(docs), "batch_size": batch_size, "partitions": 4,
                  "method": __doc__.split("How it is measured (printed with the results): ")[1].strip()}
    return out
