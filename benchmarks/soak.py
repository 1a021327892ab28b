"""``macstream bench soak``: what ``macstream up`` runs, fed a continuous stream for a long time with questions
alongside: resident memory and query latency over time, and nothing lost.

How it is measured (printed with the results): one process runs what ``macstream up`` runs (a local Tansu broker, a
local Ray cluster, the Serve HTTP app and the ingest job supervised from a background thread, the product's ingest
and serve defaults) over one fresh embedded store, optionally pre-filled with ``prefill`` random windows in the
checkpoint's collection (so the soak runs at the size of weeks of news without weeks of encoding). A producer thread
produces ``documents`` synthetic articles (fresh ids; a pool of test-split articles reused under new ids) at
``rate`` docs/s, open loop (production never waits for ingest). A client thread asks one of the pool's questions
every 1/``qps`` s (POST /v1/answer: the server's default mode and top_k, ``max_new_tokens``) and records the HTTP
latency and the server's own retrieval time. Every ``sample_s`` s a sampler records the resident memory of the
whole product (this process and every process it started: broker, Ray's GCS and raylet, the store owner, the serve
replica and proxy, the encoders; RSS, and its anonymous part = RSS - shared: the heaps, without memory-mapped files
and the object store) and of the store owner alone, and the store's counts. Warm-up is the first ``warmup`` share of
the stream; growth = last sample / first sample after warm-up - 1. Nothing lost: once the stream is produced and
ingest has drained, every produced document is in the store with its content hash and the store counts the prefill
plus the produced documents.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

from benchmarks.freshness import _Api, _Supervisor, articles, pct, serve_ready
from benchmarks.machine import machine
from pipeline.cluster import init_ray
from pipeline.config import IngestConfig, ServeConfig
from workers import kafka_io
from workers.broker import LocalBroker, free_port
from workers.ingest import IngestJob
from workers.messages import content_hash, encode

POOL = 400  # distinct synthetic articles, produced again and again under fresh ids


def _role(cmdline: str) -> str:
    for needle, role in (("StoreActor", "store"), ("ServeReplica", "serve"), ("ProxyActor", "serve"),
                         ("Encoder", "encoders"), ("Consumer", "consumers"), ("tansu", "broker"),
                         ("gcs_server", "ray"), ("raylet", "ray")):
        if needle in cmdline:
            return role
    return "other"


def memory() -> dict:
    """RSS and anonymous RSS (MB) of this process and all its descendants, in total and by role."""
    me = psutil.Process()
    out: dict = {"rss_mb": 0.0, "anon_mb": 0.0, "processes": 0, "by_role": {}}
    for p in [me, *me.children(recursive=True)]:
        try:
            m, cmd = p.memory_info(), " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = "driver" if p.pid == me.pid else _role(cmd)
        rss, anon = m.rss / 2**20, (m.rss - m.shared) / 2**20
        out["rss_mb"] += rss
        out["anon_mb"] += anon
        out["processes"] += 1
        r = out["by_role"].setdefault(role, {"rss_mb": 0.0, "anon_mb": 0.0})
        r["rss_mb"] += rss
        r["anon_mb"] += anon
    return out


def prefill_store(location: str, checkpoint: str | None, windows: int, seed: int = 0) -> None:
    """``windows`` random windows (one per document, random unit retrieval vectors far from any real question) in
    the checkpoint's collection, written directly before the product starts."""
    from datetime import timedelta

    from pipeline.model.mac import checkpoint_identity
    from pipeline.modulation import Modulation
    from pipeline.schemas import Document, EncodedChunk
    from pipeline.store import collection_name, open_store

    version, model_id = checkpoint_identity(checkpoint)
    rng = np.random.default_rng(seed)
    store, coll = open_store(location), collection_name(version)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        for i in range(windows):
            v = rng.standard_normal(384, dtype=np.float32)
            tokens = (rng.standard_normal((48, 576), dtype=np.float32) * 0.5).astype(np.float16)
            doc = Document(id=f"prefill-{i}", text=f"archive story {i}", source="archive",
                           published_at=t0 + timedelta(minutes=i))
            store.upsert(coll, doc, f"p{i}", [EncodedChunk(Modulation(doc.id, 0, 1, tokens, model_id, version),
                                                           v / np.linalg.norm(v))])
    finally:
        store.close()


class _Sampler(threading.Thread):
    def __init__(self, store, collection: str, every_s: float, t0: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.store, self.collection, self.every_s, self.t0 = store, collection, every_s, t0
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def sample(self) -> None:
        try:
            counts = self.store.counts(self.collection)
        except Exception as e:  # noqa: BLE001 - recorded, the soak goes on
            counts = {"error": type(e).__name__}
        self.samples.append({"t_s": time.monotonic() - self.t0, **memory(), "store": counts})

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            self.sample()


class _Asker(threading.Thread):
    def __init__(self, api: _Api, questions: list[str], qps: float, t0: float):
        super().__init__(daemon=True, name="soak-asker")
        self.api, self.questions, self.qps, self.t0 = api, questions, qps, t0
        self.rows: list[tuple[float, float, float | None]] = []  # (t_s, http latency s, retrieve s)
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            sent, got, body = self.api.ask(self.questions[i % len(self.questions)])
            retrieve = body.get("timings", {}).get("retrieve") if body else None
            self.rows.append((sent - self.t0, got - sent, retrieve))
            i += 1
            self.halt.wait(max(0.0, sent + 1.0 / self.qps - time.monotonic()))


def _windows(samples: list[dict], asked: list[tuple], warm_s: float) -> list[dict]:
    """Per sampling interval: memory at its end and the latency percentiles of the questions asked within it."""
    out, start = [], 0.0
    for s in samples:
        lat = [r[1] for r in asked if start <= r[0] < s["t_s"]]
        ret = [r[2] for r in asked if start <= r[0] < s["t_s"] and r[2] is not None]
        out.append({"t_s": round(s["t_s"], 1), "warm": s["t_s"] >= warm_s, "rss_mb": round(s["rss_mb"], 1),
                    "anon_mb": round(s["anon_mb"], 1),
                    "store_rss_mb": round(s["by_role"].get("store", {}).get("rss_mb", 0.0), 1),
                    "store_anon_mb": round(s["by_role"].get("store", {}).get("anon_mb", 0.0), 1),
                    "anon_mb_by_role": {r: round(v["anon_mb"], 1) for r, v in sorted(s["by_role"].items())},
                    "chunks": s["store"].get("chunks"), "documents": s["store"].get("documents"),
                    "questions": len(lat), "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99),
                    "retrieve_p99_ms": None if not ret else pct(ret, 0.99) * 1e3})
        start = s["t_s"]
    return out


def growth(windows: list[dict], key: str) -> float | None:
    """Last warm sample / first warm sample - 1 (None before two warm samples)."""
    warm = [w[key] for w in windows if w["warm"] and w[key] is not None]
    return None if len(warm) < 2 else warm[-1] / warm[0] - 1.0


def run(checkpoint: str | None = None, documents: int = 20_000, rate: float = 8.0, qps: float = 0.5,
        prefill: int = 0, sample_s: float = 15.0, warmup: float = 0.1, max_new_tokens: int = 1, workers: int = 1,
        drain_timeout_s: float = 900.0, seed: int = 0) -> dict:
    import ray
    from ray import serve

    from pipeline.store.actor import connect_store, store_actor_name

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load_before = os.getloadavg()
    tag = f"{time.time_ns():x}"
    pool = articles(POOL, seed, tag)
    tmp = Path(tempfile.mkdtemp(prefix="macstream-bench-soak-"))
    store_dir = str(tmp / "store")
    if prefill:
        t = time.monotonic()
        prefill_store(store_dir, checkpoint, prefill, seed)
        print(f"soak: prefilled {prefill} windows in {time.monotonic() - t:.0f} s", flush=True)
    produced: dict[str, str] = {}
    started_ray = not ray.is_initialized()
    result: dict = {}
    with LocalBroker(log_dir=tmp / "logs") as broker:
        try:
            init_ray()
            scfg = ServeConfig(port=free_port(), checkpoint=checkpoint, store=store_dir)
            base = serve_ready(scfg)
            topic = f"soak-{tag}"
            kafka_io.ensure_topic(broker.bootstrap, topic, 4)
            cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic=topic, workers=workers,
                               group_id=f"soak-{tag}", store=store_dir, checkpoint=checkpoint)
            job = IngestJob(cfg, progress=False).start()
            sup = _Supervisor(job)
            sup.start()
            store = connect_store(cfg.store_location())
            t0 = time.monotonic()
            sampler = _Sampler(store, job.collection, sample_s, t0)
            sampler.sample()
            sampler.start()
            api = _Api(base, 120.0, None)
            api.body["max_new_tokens"] = max_new_tokens
            asker = _Asker(api, [q for _, q in pool], qps, t0)
            asker.start()
            prod = kafka_io.producer(broker.bootstrap)
            try:
                for i in range(documents):
                    doc = pool[i % POOL][0]
                    doc = doc.model_copy(update={"id": f"soak-{i}-{doc.id}"})
                    key, value = encode(doc)
                    prod.send(topic, key=key, value=value)
                    produced[doc.id] = content_hash(doc)
                    if i % 1000 == 999:
                        print(f"soak: produced {i + 1}/{documents} at {time.monotonic() - t0:.0f} s; store "
                              f"{sampler.samples[-1]['store']}; RSS {sampler.samples[-1]['rss_mb']:.0f} MB",
                              flush=True)
                    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
                prod.flush()
            finally:
                prod.close()
            produced_s = time.monotonic() - t0
            deadline = time.monotonic() + drain_timeout_s
            while store.counts(job.collection)["documents"] < prefill + documents and time.monotonic() < deadline:
                time.sleep(2.0)
            drained_s = time.monotonic() - t0
            asker.halt.set()
            sampler.halt.set()
            asker.join(timeout=180)
            sampler.join(timeout=60)
            sampler.sample()
            ids = list(produced)
            held: dict[str, str] = {}
            for s in range(0, len(ids), 512):
                held |= store.content_hashes(job.collection, ids[s: s + 512])
            counts = store.counts(job.collection)
            ingest = sup.finish()
            windows = _windows(sampler.samples, asker.rows, warmup * produced_s)
            lat = [r[1] for r in asker.rows]
            result = {
                "documents": documents, "prefill": prefill, "produced_s": produced_s, "drained_s": drained_s,
                "docs_per_s": documents / drained_s, "lost": sum(1 for i in ids if held.get(i) != produced[i]),
                "counts": counts, "counts_expected_documents": prefill + documents,
                "questions": len(lat), "http_errors": asker.api.errors, "p50_s": pct(lat, 0.5),
                "p99_s": pct(lat, 0.99), "rss_growth": growth(windows, "rss_mb"),
                "anon_growth": growth(windows, "anon_mb"), "store_anon_growth": growth(windows, "store_anon_mb"),
                "windows": windows, "ingest": {k: v for k, v in ingest.items() if not isinstance(v, (list, dict))},
            }
        finally:
            try:
                serve.shutdown()
            finally:
                if started_ray:
                    ray.shutdown()
                else:
                    try:
                        ray.kill(ray.get_actor(store_actor_name(store_dir), namespace="macstream"), no_restart=True)
                    except ValueError:
                        pass
    shutil.rmtree(tmp, ignore_errors=True)
    result["how"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                     "load_average_before": [round(x, 2) for x in load_before],
                     "load_average_after": [round(x, 2) for x in os.getloadavg()],
                     "checkpoint": checkpoint or "shipped", "rate_docs_per_s": rate, "qps": qps,
                     "sample_s": sample_s, "warmup_share": warmup, "max_new_tokens": max_new_tokens,
                     "workers": workers, "pool_articles": POOL,
                     "method": __doc__.split("How it is measured (printed with the results): ")[1].strip()}
    return result


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result["windows"]
    t = [x["t_s"] / 60 for x in w]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, [x["rss_mb"] for x in w], label="product RSS")
    a.plot(t, [x["anon_mb"] for x in w], label="product anonymous (heaps)")
    a.plot(t, [x["store_rss_mb"] for x in w], label="store owner RSS")
    a.set_ylabel("MB")
    a.legend(fontsize=8)
    c = a.twinx()
    c.plot(t, [x["chunks"] or 0 for x in w], color="grey", linestyle=":", label="windows stored")
    c.set_ylabel("windows stored")
    b.plot(t, [x["p99_s"] for x in w], label="HTTP p99 (s)")
    b.plot(t, [x["p50_s"] for x in w], label="HTTP p50 (s)")
    b.set_ylabel("s")
    b.set_xlabel("minutes")
    d = b.twinx()
    d.plot(t, [x["retrieve_p99_ms"] for x in w], color="C3", linestyle="--", label="retrieve p99 (ms)")
    d.set_ylabel("retrieve p99, ms")
    b.legend(fontsize=8, loc="upper left")
    d.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"soak: {result['documents']} documents at {result['how']['rate_docs_per_s']}/s, "
                 f"{result['prefill']} prefilled windows")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    g = lambda x: "–" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    return "\n".join([
        "| documents | prefill | docs/s | lost | questions | HTTP p50 / p99 s | RSS growth | heap growth | "
        "store-owner heap growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {result['documents']} | {result['prefill']} | {result['docs_per_s']:.1f} | {result['lost']} | "
        f"{result['questions']} | {result['p50_s']:.2f} / {result['p99_s']:.2f} | {g(result['rss_growth'])} | "
        f"{g(result['anon_growth'])} | {g(result['store_anon_growth'])} |"])
