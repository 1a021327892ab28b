"""``macstream bench backfill``: documents per second of archive backfill beside streaming ingest, on the same
documents, by number of encoder workers.

How it is measured (printed with the results): the synthetic test split, written once to a Parquet file for
backfill and produced once to a topic of 4 partitions (a local Tansu broker) for ingest. For each worker count,
ingest then backfill, each on a fresh Ray cluster sized to this machine and a fresh embedded store. Ingest docs/s is
`bench ingest`'s (documents written / seconds from the job's first poll to the last commit). Backfill docs/s =
documents written / seconds from the encoders being ready to the last write: its second pass over the source (Ray Data
start included) and whatever of its first pass outlasts model loading count; model loading does not, as for ingest.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import ingest
from benchmarks.machine import machine
from pipeline.cluster import init_ray
from pipeline.config import BackfillConfig
from pipeline.data.synthetic import generate
from workers.backfill import BackfillJob


def write_archive(path: Path, docs) -> None:
    """The documents as one Parquet file, one row per document, its columns the document's fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([d.model_dump(mode="json") for d in docs]), path)


def backfill_once(checkpoint: str | None, source: Path, workers: int, batch_size: int) -> dict:
    import ray

    init_ray()
    try:
        store = Path(tempfile.mkdtemp(prefix="macstream-bench-backfill-")) / "store"
        cfg = BackfillConfig(source=str(source), store=str(store), checkpoint=checkpoint, workers=workers,
                             batch_size=batch_size)
        rep = BackfillJob(cfg, progress=False).start().run()
    finally:
        ray.shutdown()
    return {"workers": workers, "documents": rep["upserted"], "seconds": rep["elapsed_s"],
            "docs_per_s": rep["docs_per_s"], "first_pass_s": rep["plan_s"],
            "batch_latency_p50_s": rep["batch_latency_p50_s"], "dead_lettered": rep["dead_lettered"]}


def run(checkpoint: str | None = None, entities: int = 40, workers: tuple[int, ...] = (1, 2),
        batch_size: int = 16) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    docs = sorted(generate("test", entities, seed=0)[0], key=lambda d: (d.published_at, d.id))
    source = Path(tempfile.mkdtemp(prefix="macstream-bench-archive-")) / "archive.parquet"
    write_archive(source, docs)
    runs = []
    for n in workers:  # interleaved, so a change in the machine's load hits both paths alike
        streamed = ingest.run(checkpoint, entities, (n,), batch_size)["runs"][0]
        runs.append({"workers": n, "ingest": streamed, "backfill": backfill_once(checkpoint, source, n, batch_size)})
    by = {r["workers"]: r for r in runs}
    out: dict = {"runs": runs, "checks": {
        "backfill_at_least_ingest": {n: r["backfill"]["docs_per_s"] >= r["ingest"]["docs_per_s"]
                                     for n, r in by.items()},
        "backfill_over_ingest": {n: r["backfill"]["docs_per_s"] / r["ingest"]["docs_per_s"] for n, r in by.items()}}}
    if 1 in by and 2 in by:
        out["checks"]["backfill_2_over_1_workers"] = by[2]["backfill"]["docs_per_s"] / by[1]["backfill"]["docs_per_s"]
        out["checks"]["ingest_2_over_1_workers"] = by[2]["ingest"]["docs_per_s"] / by[1]["ingest"]["docs_per_s"]
    out["how"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                  "checkpoint": checkpoint or "shipped", "documents": len(docs), "batch_size": batch_size,
                  "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                  "method": __doc__.split("How it is measured (printed with the results): ")[1].strip()}
    return out


def table(result: dict) -> str:
    lines = ["| workers | ingest docs/s | backfill docs/s | backfill / ingest |", "| --- | --- | --- | --- |"]
    for r in result["runs"]:
        i, b = r["ingest"]["docs_per_s"], r["backfill"]["docs_per_s"]
        lines.append(f"| {r['workers']} | {i:.2f} | {b:.2f} | {b / i:.2f} |")
    return "\n".join(lines)
