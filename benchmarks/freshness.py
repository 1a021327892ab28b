"""``macstream bench freshness``: how long after a document is produced to Kafka the HTTP API answers with it cited.

How it is measured (printed with the results): one process runs what ``macstream up`` runs: a local Tansu broker,
a local Ray cluster, the Serve HTTP app and the ingest job (supervised from a background thread of the driver), over
one fresh embedded store. Warm-up: a few articles are ingested and asked about before anything is timed. Capacity: a
burst of articles is produced at once; capacity = burst size / seconds from the burst's broker acknowledgement to its
last document in the store. Then fresh synthetic test articles (one per fictional company, ids never seen before)
are produced one at a time, evenly spaced at half that capacity (open loop: production never waits for ingest); each
document's clock starts when the broker acknowledges it (acks=all). A store watcher asks the store owner every 20 ms
which of the pending documents it holds. For each document, from the moment the store holds it (``gate: store``) or
from its acknowledgement (``gate: none``), the driver asks the API that document's question (POST /v1/answer, the
server's default mode unless one is named, its default top_k, max_new_tokens 1: the sources do not depend on the
answer's length) every poll interval until the answer cites the document among its sources. time-to-queryable = the
later of (the store holds it, the first citing poll was sent) − its produce acknowledgement (a poll sent before the
write can still cite the document when it waited in Serve's queue); the response time of that poll is reported too
(answered: an upper bound, which includes the queueing the benchmark's own questions cause). Stages: ack → fetchable
(a second, group-less consumer with ingest's client settings receives the record), ack → in store (Kafka fetch,
batching, encode, write), in store → cited; the consumer's batch seconds (submit to commit), one document's encode
call and one store write are measured separately, the last two with ingest idle.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

from benchmarks.machine import machine
from pipeline.cluster import init_ray
from pipeline.config import IngestConfig, ServeConfig
from pipeline.data.synthetic import generate
from pipeline.schemas import Document
from serving.app import start as start_serving
from workers import kafka_io
from workers.broker import LocalBroker, free_port
from workers.ingest import IngestJob
from workers.messages import content_hash, encode

GOAL_P99_S = 2.0  # issue 14: p99 time-to-queryable on this machine, the always-on path, warm
STORE_WATCH_S = 0.02
WARMUP_DOCS = 4
TUNABLE = ("batch_size", "poll_timeout_ms", "max_in_flight", "workers", "encoder_threads")


def serve_ready(scfg: ServeConfig, within_s: float = 600) -> str:
    """Start the Serve app of ``scfg`` and wait until its /ready answers 200 (RuntimeError after ``within_s``);
    returns its base URL."""
    start_serving(scfg)
    base = f"http://{scfg.host}:{scfg.port}"
    deadline = time.monotonic() + within_s
    while True:
        try:
            if requests.get(base + "/ready", timeout=10).status_code == 200:
                return base
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not become ready within {within_s:.0f} s")
        time.sleep(0.2)


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99),
            "max": max(xs) if xs else None, "mean": statistics.fmean(xs) if xs else None}


def parse_variant(text: str) -> dict:
    """``"batch_size=4,poll_timeout_ms=50"`` → ingest settings to change (only the latency knobs in ``TUNABLE``)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in TUNABLE or not value:
            raise ValueError(f"freshness variant {part!r}: expected KEY=INT with KEY one of {', '.join(TUNABLE)}")
        out[key] = int(value)
    return out


def articles(n: int, seed: int, tag: str) -> list[tuple[Document, str]]:
    """``n`` synthetic test articles, one per fictional entity (so each question has one right document), with
    fresh ids ``fresh-<tag>-...``, each with a question that only it answers."""
    docs, questions = generate("test", n, seed=seed)
    question = {}
    for q in questions:
        question.setdefault(q.doc_ids[0], q.question)
    seen, out = set(), []
    for d in docs:
        entity = d.id.rsplit("-a", 1)[0]
        if entity in seen or d.id not in question:
            continue
        seen.add(entity)
        out.append((d.model_copy(update={"id": f"fresh-{tag}-{d.id}"}), question[d.id]))
    if len(out) < n:
        raise ValueError(f"synthetic test split gave {len(out)} entities with questions, wanted {n}")
    return out[:n]


@dataclass
class _Tracked:
    doc: Document
    question: str
    sent: float  # monotonic: handed to the producer
    acked: float  # monotonic: broker acknowledged (the clock starts here)
    in_store: float | None = None
    in_store_event: threading.Event = field(default_factory=threading.Event)


class _StoreWatcher(threading.Thread):
    """Every ``STORE_WATCH_S``: which pending documents does the store hold? Records when each first appears."""

    def __init__(self, store, collection: str):
        super().__init__(daemon=True, name="freshness-store-watcher")
        self.store, self.collection = store, collection
        self.pending: dict[str, _Tracked] = {}
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.errors = 0

    def add(self, t: _Tracked) -> None:
        with self.lock:
            self.pending[t.doc.id] = t

    def run(self) -> None:
        while not self.halt.is_set():
            with self.lock:
                ids = list(self.pending)
            if ids:
                try:
                    held = self.store.content_hashes(self.collection, ids)
                except Exception:  # noqa: BLE001 - a transient store error: look again next tick
                    self.errors += 1
                    held = {}
                now = time.monotonic()
                with self.lock:
                    for i in held:
                        t = self.pending.pop(i, None)
                        if t is not None:
                            t.in_store = now
                            t.in_store_event.set()
            self.halt.wait(STORE_WATCH_S)


class _KafkaWatcher(threading.Thread):
    """A second, group-less consumer on the topic (same client settings as ingest's): when each document is first
    fetchable from the broker. It shows how much of the time is Kafka delivery, not ingest."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import TopicPartition

        super().__init__(daemon=True, name="freshness-kafka-watcher")
        self.consumer = kafka_io.consumer(bootstrap, None)
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]
        self.consumer.assign(tps)
        self.consumer.seek_to_end()
        for tp in tps:
            self.consumer.position(tp)  # resolve the end offsets now, before anything is produced
        self.seen: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                batch = self.consumer.poll(timeout_ms=50)
                now = time.monotonic()
                for recs in batch.values():
                    for r in recs:
                        if r.key is not None:
                            self.seen.setdefault(r.key.decode("utf-8", "replace"), now)
        finally:
            self.consumer.close()


class _Supervisor(threading.Thread):
    """The ingest job's supervision loop (what ``IngestJob.run`` does) in a background thread of the driver, until
    told to stop; then ``IngestJob.stop`` drains and commits."""

    def __init__(self, job: IngestJob):
        super().__init__(daemon=True, name="freshness-ingest-supervisor")
        self.job, self.halt, self.snapshot = job, threading.Event(), None

    def run(self) -> None:
        while not self.halt.is_set():
            self.job.supervise()
            self.halt.wait(0.5)
        self.snapshot = self.job.stop()

    def finish(self) -> dict:
        self.halt.set()
        self.join(timeout=120)
        return self.snapshot or {}


class _Api:
    def __init__(self, base: str, timeout_s: float, mode: str | None = None):
        self.base, self.timeout_s = base, timeout_s
        self.body = {"max_new_tokens": 1} | ({"mode": mode} if mode else {})
        self.local = threading.local()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def ask(self, question: str) -> tuple[float, float, dict | None]:
        """(send time, response time, body or None on an HTTP error)."""
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        t0 = time.monotonic()
        try:
            r = self.local.session.post(self.base + "/v1/answer", json={"question": question, **self.body},
                                        timeout=self.timeout_s)
            body = r.json() if r.status_code == 200 else None
            err = None if body is not None else f"http_{r.status_code}"
        except (requests.RequestException, ValueError) as e:
            body, err = None, type(e).__name__
        t1 = time.monotonic()
        with self.lock:
            self.latencies.append(t1 - t0)
            if err:
                self.errors[err] = self.errors.get(err, 0) + 1
        return t0, t1, body


def _track(api: _Api, t: _Tracked, gate: str, poll_interval: float, timeout_s: float) -> dict:
    """Poll the API for one document until an answer cites it (or ``timeout_s`` after its acknowledgement)."""
    deadline = t.acked + timeout_s
    if gate == "store":
        t.in_store_event.wait(max(0.0, deadline - time.monotonic()))
    polls, row = 0, {"id": t.doc.id, "queryable": False}
    while time.monotonic() < deadline:
        sent, got, body = api.ask(t.question)
        polls += 1
        ids = [s["id"] for s in body["sources"]] if body else []
        if t.doc.id in ids:
            row.update(queryable=True, cited_poll_sent_s=sent - t.acked, answered_s=got - t.acked,
                       rank=ids.index(t.doc.id) + 1, mode=body["mode"], answer_timings=body.get("timings"))
            break
        time.sleep(max(0.0, sent + poll_interval - time.monotonic()))
    row["polls"] = polls
    t.in_store_event.wait(max(0.0, deadline - time.monotonic()))  # the store watcher's time, for the stage split
    row["produce_ack_s"] = t.acked - t.sent
    row["_acked"] = t.acked
    row["in_store_s"] = None if t.in_store is None else t.in_store - t.acked
    if row["queryable"]:
        # A poll sent before the store held the document can still cite it: it waited in Serve's queue and retrieved
        # later. The document is queryable from when the store holds it (the API reads that store), and the citing
        # answer proves it is then found: ttq = the later of the two.
        row["ttq_s"] = max(row["cited_poll_sent_s"], row["in_store_s"] if row["in_store_s"] is not None else 0.0)
        if row["in_store_s"] is not None:
            row["store_to_cited_s"] = row["ttq_s"] - row["in_store_s"]
    return row


def _produce(prod, topic: str, doc: Document) -> tuple[float, float]:
    key, value = encode(doc)
    sent = time.monotonic()
    prod.send(topic, key=key, value=value).get(timeout=30)  # acks=all
    return sent, time.monotonic()


def _consumer_stats(job: IngestJob) -> list[dict]:
    import ray

    return ray.get([actor.stats.remote() for actor, _ in job.members.values()], timeout=30)


def _batches_between(before: list[dict], after: list[dict]) -> dict:
    secs, records, batches = [], 0, 0
    for b, a in zip(before, after):
        n = a["counters"].get("batches", 0) - b["counters"].get("batches", 0)
        batches += n
        records += a["counters"].get("records", 0) - b["counters"].get("records", 0)
        secs += a["batch_seconds"][-n:] if n > 0 else []
    return {"batches": batches, "records": records, "records_per_batch": records / batches if batches else None,
            "batch_seconds": summary(secs)}


def _wait_in_store(watcher: _StoreWatcher, tracked: list[_Tracked], timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    for t in tracked:
        if not t.in_store_event.wait(max(0.0, deadline - time.monotonic())):
            return None
    return max(t.in_store for t in tracked)


def _variant(name: str, cfg: IngestConfig, topic: str, prod, watcher_for, api: _Api, docs: list[tuple[Document, str]],
             burst: list[tuple[Document, str]], rate: float | None, poll_interval: float, gate: str,
             timeout_s: float, encode_probe: int) -> dict:
    """One ingest configuration: start its job, warm up, (measure capacity,) measure freshness, stop it."""
    import ray

    bootstrap = cfg.bootstrap_servers
    kafka_io.ensure_topic(bootstrap, topic, 4)
    job = IngestJob(cfg.model_copy(update={"topic": topic}), progress=False).start()
    sup = _Supervisor(job)
    sup.start()
    watcher = watcher_for(job.collection)
    watcher.start()
    out: dict = {"name": name, "ingest": {k: getattr(cfg, k) for k in TUNABLE}}
    try:
        # warm-up: the first encode calls and answers are slow (allocation, first forward); nothing here is timed
        warm, rest = docs[:WARMUP_DOCS], docs[WARMUP_DOCS:]
        warm_t = []
        for d, q in warm:
            s, a = _produce(prod, topic, d)
            warm_t.append(_Tracked(d, q, s, a))
            watcher.add(warm_t[-1])
        if _wait_in_store(watcher, warm_t, timeout_s) is None:
            raise RuntimeError(f"warm-up documents were not ingested within {timeout_s:.0f} s")
        for t in warm_t:
            _track(api, t, "store", poll_interval, timeout_s)
        if burst:
            futures = [prod.send(topic, key=encode(d)[0], value=encode(d)[1]) for d, _ in burst]
            prod.flush()
            for f in futures:
                f.get(timeout=30)
            acked = time.monotonic()
            burst_t = [_Tracked(d, q, acked, acked) for d, q in burst]
            for t in burst_t:
                watcher.add(t)
            done = _wait_in_store(watcher, burst_t, max(timeout_s, 10 * len(burst)))
            if done is None:
                raise RuntimeError("the capacity burst was not ingested in time")
            out["capacity"] = {"documents": len(burst), "seconds": done - acked,
                               "docs_per_s": len(burst) / (done - acked)}
            rate = rate or out["capacity"]["docs_per_s"] / 2
        assert rate, "a rate, or a burst to measure capacity from"
        out["rate_docs_per_s"] = rate
        kwatch = _KafkaWatcher(bootstrap, topic)
        kwatch.start()
        before = _consumer_stats(job)
        lat0 = len(api.latencies)
        rows: list = []
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="freshness-poll") as pool:
            futures = []
            for i, (d, q) in enumerate(rest):
                wait = t0 + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                s, a = _produce(prod, topic, d)
                t = _Tracked(d, q, s, a)
                watcher.add(t)
                futures.append(pool.submit(_track, api, t, gate, poll_interval, timeout_s))
            produced_s = time.monotonic() - t0
            rows = [f.result() for f in futures]
        kwatch.halt.set()
        kwatch.join(timeout=10)
        for row, (d, _) in zip(rows, rest):
            fetched = kwatch.seen.get(d.id)
            row["kafka_fetch_s"] = None if fetched is None else fetched - (row["_acked"])
        after = _consumer_stats(job)
        out["produced_seconds"] = produced_s
        out["achieved_rate_docs_per_s"] = (len(rest) - 1) / produced_s if len(rest) > 1 and produced_s else None
        out["ingest_batches"] = _batches_between(before, after)
        lat = api.latencies[lat0:]
        out["poll_response_s"] = summary(lat)
        # with ingest idle: one document's encode call through the actor (Ray round trip included), then its write
        # to the store through the store owner (the probe copy is deleted again)
        probe, write = [], []
        for d, _ in rest[:encode_probe]:
            doc = d.model_copy(update={"id": d.id + "-probe"})
            e0 = time.monotonic()
            chunks = ray.get(job.encoders[0].encode.remote([doc]))[0]
            e1 = time.monotonic()
            job.store.upsert(job.collection, doc, content_hash(doc), chunks)
            write.append(time.monotonic() - e1)
            probe.append(e1 - e0)
            job.store.delete(job.collection, doc.id)
        out["encode_one_doc_s"], out["store_write_one_doc_s"] = summary(probe), summary(write)
    finally:
        watcher.halt.set()
        watcher.join(timeout=5)
        snap = sup.finish()
    ok = [r for r in rows if r["queryable"]]
    out.update({
        "documents": len(rows), "queryable": len(ok),
        "ttq_s": summary([r["ttq_s"] for r in ok]),
        "answered_s": summary([r["answered_s"] for r in ok]),
        # the citing answer's share of the replica's compute (retrieve + aggregate + generate, each this question's
        # share of its batch): 1 / mean = the answers per second the replica sustained; the rest is queueing
        "answer_server_s": summary([sum((r.get("answer_timings") or {}).values()) for r in ok]),
        "in_store_s": summary([r["in_store_s"] for r in rows if r["in_store_s"] is not None]),
        "store_to_cited_s": summary([r["store_to_cited_s"] for r in ok if "store_to_cited_s" in r]),
        "produce_ack_s": summary([r["produce_ack_s"] for r in rows]),
        "kafka_fetch_s": summary([r["kafka_fetch_s"] for r in rows if r.get("kafka_fetch_s") is not None]),
        "polls_per_document": summary([float(r["polls"]) for r in rows]),
        "cited_rank": {str(k): sum(1 for r in ok if r["rank"] == k) for k in sorted({r["rank"] for r in ok})},
        "dead_lettered": snap.get("dead_lettered"),
        "store_watch_errors": watcher.errors,
    })
    p99 = out["ttq_s"]["p99"]
    out["goal"] = {"p99_s": GOAL_P99_S, "met": bool(p99 is not None and p99 <= GOAL_P99_S and len(ok) == len(rows))}
    for r in rows:
        r.pop("_acked", None)
    out["per_document"] = rows
    return out


def run(checkpoint: str | None = None, documents: int = 60, rate: float | None = None, burst: int = 32,
        poll_interval_s: float = 0.05, variants: tuple[dict, ...] = (), gate: str = "store", timeout_s: float = 60.0,
        workers: int = 1, encode_probe: int = 5, seed: int = 0, mode: str | None = None) -> dict:
    """Measure time-to-queryable with the product's ingest defaults, then with each variant (a dict of ingest
    settings from ``TUNABLE``), all at one rate: ``rate`` docs/s, or half the capacity the defaults measure on a
    burst of ``burst`` documents. ``mode``: the answer mode the polls ask for (None: the server's default)."""
    import ray
    from ray import serve

    from pipeline.store.actor import connect_store, store_actor_name

    if gate not in ("store", "none"):
        raise ValueError(f"gate must be 'store' or 'none', not {gate!r}")
    if rate is None and not burst:
        raise ValueError("give a rate, or a burst size to measure the capacity from")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load_before = os.getloadavg()
    rate_given = rate is not None
    tag = f"{time.time_ns():x}"
    configs = [("product defaults", {}),
               *((", ".join(f"{k}={v}" for k, v in v.items()) or "defaults", v) for v in variants)]
    per = WARMUP_DOCS + documents
    pool = articles(burst + per * len(configs), seed, tag)
    burst_docs, pool = pool[:burst], pool[burst:]
    tmp = Path(tempfile.mkdtemp(prefix="macstream-bench-freshness-"))
    store = str(tmp / "store")
    started_ray = not ray.is_initialized()
    result: dict = {"runs": []}
    with LocalBroker(log_dir=tmp / "logs") as broker:
        try:
            init_ray()
            scfg = ServeConfig(port=free_port(), checkpoint=checkpoint, store=store)
            base = serve_ready(scfg)
            store_proxy = connect_store(scfg.store_location())
            api = _Api(base, timeout_s, mode)
            prod = kafka_io.producer(broker.bootstrap)
            try:
                for i, (name, change) in enumerate(configs):
                    cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic="unused", workers=workers,
                                       group_id=f"freshness-{tag}-{i}", store=store, checkpoint=checkpoint, **change)
                    run_ = _variant(name, cfg, f"freshness-{tag}-{i}", prod,
                                    lambda coll: _StoreWatcher(store_proxy, coll), api, pool[i * per:(i + 1) * per],
                                    burst_docs if i == 0 else [], rate, poll_interval_s, gate, timeout_s, encode_probe)
                    rate = run_["rate_docs_per_s"]  # every variant at the rate the first one set
                    result["runs"].append(run_)
            finally:
                prod.close()
            default_mode = requests.get(base + "/health", timeout=10).json().get("default_mode", scfg.default_mode)
        finally:
            try:
                serve.shutdown()
            finally:
                if started_ray:
                    ray.shutdown()
                else:  # a cluster we joined: release the store directory its detached owner holds
                    try:
                        ray.kill(ray.get_actor(store_actor_name(store), namespace="macstream"), no_restart=True)
                    except ValueError:
                        pass
    shutil.rmtree(tmp, ignore_errors=True)
    first = result["runs"][0]
    result["how"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "checkpoint": checkpoint or "shipped", "documents": documents, "rate_docs_per_s": rate,
        "rate_from": "given" if rate_given else "half the measured capacity",
        "capacity_docs_per_s": first.get("capacity", {}).get("docs_per_s"), "burst_documents": burst,
        "poll_interval_s": poll_interval_s, "gate": gate, "store_watch_s": STORE_WATCH_S, "timeout_s": timeout_s,
        "warm": True, "warmup_documents": WARMUP_DOCS, "mode": mode or default_mode,
        "server_default_mode": default_mode,
        "top_k": scfg.default_top_k,
        "poll_max_new_tokens": 1, "encoder_workers": workers, "replica_threads": scfg.replica_threads,
        "serve_batch_wait_s": scfg.batch_wait_timeout_s, "partitions": 4,
        "method": __doc__.split("How it is measured (printed with the results): ")[1].strip(),
    }
    return result


def table(result: dict) -> str:
    """One row per ingest configuration: time-to-queryable and its stages (seconds after the produce ack)."""
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    pp = lambda d: f"{f(d['p50'])} / {f(d['p99'])}"  # noqa: E731
    lines = ["| ingest settings | rate docs/s | queryable | ttq p50 | p90 | p99 | max | fetchable p50 / p99 "
             "| in store p50 / p99 | store → cited p50 / p99 | answered p50 / p99 | goal p99 ≤ 2 s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        t = r["ttq_s"]
        settings = ", ".join(f"{k}={v}" for k, v in r["ingest"].items())
        lines.append(f"| {r['name']}: {settings} | {r['rate_docs_per_s']:.2f} | {r['queryable']}/{r['documents']} | "
                     f"{f(t['p50'])} | {f(t['p90'])} | {f(t['p99'])} | {f(t['max'])} | {pp(r['kafka_fetch_s'])} | "
                     f"{pp(r['in_store_s'])} | {pp(r['store_to_cited_s'])} | {pp(r['answered_s'])} | "
                     f"{'met' if r['goal']['met'] else 'NOT met'} |")
    return "\n".join(lines)


def stages(run: dict) -> str:
    """One line: where a run's time went, from the separately measured stages."""
    ms = lambda x: "–" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
    b = run["ingest_batches"]
    return (f"{run['name']}: Kafka ack p50 {ms(run['produce_ack_s']['p50'])}; fetchable p50 "
            f"{ms(run['kafka_fetch_s']['p50'])}; consumer batches (submit → commit) p50 "
            f"{ms(b['batch_seconds']['p50'])}, "
            f"p99 {ms(b['batch_seconds']['p99'])}, {b['records_per_batch'] or 0:.1f} documents each; one document's "
            f"encode call {ms(run['encode_one_doc_s']['p50'])}, store write {ms(run['store_write_one_doc_s']['p50'])} "
            f"(ingest idle); poll responses p50 {ms(run['poll_response_s']['p50'])}, of which the replica's compute "
            f"per answer (its share of a batch) p50 {ms(run['answer_server_s']['p50'])}, i.e. about "
            f"{1 / run['answer_server_s']['mean'] if run['answer_server_s']['mean'] else 0:.1f} answers/s against "
            f"{run['rate_docs_per_s']:.1f} questions/s asked, the rest queueing; "
            f"{run['polls_per_document']['mean']:.1f} polls per document")


FEED_SLACK_S = 2.0  # issue 23: a story in a feed is answerable, citing it, within the poll interval + 2 s at p99


def run_feed(checkpoint: str | None = None, documents: int = 30, interval_s: float = 5.0,
             spacing_s: float | None = None, poll_interval_s: float = 0.05, timeout_s: float = 90.0, seed: int = 0,
             mode: str | None = None) -> dict:
    """Feed mode: what ``macstream up --feeds`` runs (local broker, Ray, ingest, Serve and the feed poller polling a
    local news site every ``interval_s``). Each article is published as a page and an RSS item at once; its clock
    starts when the item appears in the feed. Articles appear ``spacing_s`` apart (default 0.77 × the interval, so
    their moments fall at every phase of the poll cycle); the poll of the API for each starts once the store holds
    it (``gate: store``). time-to-queryable = the later of (in store, the first citing poll sent) − appearance;
    the wait for the next poll (uniform over the interval) is part of it, hence the goal interval + 2 s at p99."""
    import ray
    from ray import serve

    from benchmarks.feed_server import FeedSite, Story, article, rss
    from pipeline.config import FeedsConfig
    from pipeline.store.actor import connect_store
    from workers.feed_parse import story_id
    from workers.feeds import FeedPoller

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spacing_s = spacing_s if spacing_s is not None else 0.77 * interval_s
    load_before = os.getloadavg()
    tag = f"{time.time_ns():x}"
    pool = articles(WARMUP_DOCS + documents, seed, tag)
    tmp = Path(tempfile.mkdtemp(prefix="macstream-bench-freshness-feed-"))
    store = str(tmp / "store")
    out: dict = {}
    with FeedSite() as site, LocalBroker(log_dir=tmp / "logs") as broker:
        stories: list[Story] = []

        def appear(doc: Document) -> tuple[Document, float]:
            link = site.url(f"/news/{doc.id}.html")
            site.put(f"/news/{doc.id}.html", article(doc.title or doc.id, doc.text.split("\n")))
            stories.insert(0, Story(doc.title or doc.id, link, datetime.now(UTC)))
            site.put("/feed.xml", rss("Freshness wire", site.base, stories[:50]), "application/rss+xml")
            return doc.model_copy(update={"id": story_id(link), "url": link}), time.monotonic()

        site.put("/feed.xml", rss("Freshness wire", site.base, []), "application/rss+xml")
        topic = f"freshness-feed-{tag}"
        init_ray()
        try:
            scfg = ServeConfig(port=free_port(), checkpoint=checkpoint, store=store)
            cfg = IngestConfig(bootstrap_servers=broker.bootstrap, topic=topic, group_id=f"freshness-feed-{tag}",
                               store=store, checkpoint=checkpoint)
            job = IngestJob(cfg, progress=False).start()
            sup = _Supervisor(job)
            sup.start()
            base = serve_ready(scfg)
            watcher = _StoreWatcher(connect_store(scfg.store_location()), job.collection)
            watcher.start()
            api = _Api(base, timeout_s, mode)
            fcfg = FeedsConfig(sources=[site.url("/feed.xml")], topic=topic, bootstrap_servers=broker.bootstrap,
                               interval=interval_s, per_host_delay=0.0, state_dir=str(tmp / "feeds"))
            poller = FeedPoller(fcfg).start()
            try:
                warm = []
                for d, q in pool[:WARMUP_DOCS]:
                    doc, t = appear(d)
                    warm.append(_Tracked(doc, q, t, t))
                    watcher.add(warm[-1])
                if _wait_in_store(watcher, warm, timeout_s + interval_s) is None:
                    raise RuntimeError(f"warm-up stories were not ingested within {timeout_s + interval_s:.0f} s")
                for t in warm:
                    _track(api, t, "store", poll_interval_s, timeout_s)
                kwatch = _KafkaWatcher(broker.bootstrap, topic)
                kwatch.start()
                lat0 = len(api.latencies)
                t0 = time.monotonic()
                with ThreadPoolExecutor(max_workers=64, thread_name_prefix="freshness-feed-poll") as ex:
                    futures, tracked = [], []
                    for i, (d, q) in enumerate(pool[WARMUP_DOCS:]):
                        time.sleep(max(0.0, t0 + i * spacing_s - time.monotonic()))
                        doc, t = appear(d)
                        tracked.append(_Tracked(doc, q, t, t))
                        watcher.add(tracked[-1])
                        futures.append(ex.submit(_track, api, tracked[-1], "store", poll_interval_s,
                                                 timeout_s + interval_s))
                    rows = [f.result() for f in futures]
                kwatch.halt.set()
                kwatch.join(timeout=10)
                poll_snap = poller.snapshot()
            finally:
                poller.stop()
                watcher.halt.set()
                watcher.join(timeout=5)
                ingest_snap = sup.finish()
            for row, t in zip(rows, tracked):
                fetched = kwatch.seen.get(t.doc.id)
                row["on_topic_s"] = None if fetched is None else fetched - t.acked
                row.pop("_acked", None)
            ok = [r for r in rows if r["queryable"]]
            out = {
                "documents": len(rows), "queryable": len(ok), "interval_s": interval_s, "spacing_s": spacing_s,
                "ttq_s": summary([r["ttq_s"] for r in ok]),
                "on_topic_s": summary([r["on_topic_s"] for r in rows if r["on_topic_s"] is not None]),
                "in_store_s": summary([r["in_store_s"] for r in rows if r["in_store_s"] is not None]),
                "store_to_cited_s": summary([r["store_to_cited_s"] for r in ok if "store_to_cited_s" in r]),
                "answered_s": summary([r["answered_s"] for r in ok]),
                "poll_response_s": summary(api.latencies[lat0:]),
                "feeds": {k: poll_snap[k] for k in ("polls", "new", "updated", "failed", "dead_lettered")},
                "page_fetch_seconds_mean": next(iter(poll_snap["feeds"].values()))["page_fetch_seconds_mean"],
                "ingest_dead_lettered": ingest_snap.get("dead_lettered"), "per_document": rows,
            }
            p99 = out["ttq_s"]["p99"]
            goal = interval_s + FEED_SLACK_S
            out["goal"] = {"p99_s": goal, "met": bool(p99 is not None and p99 <= goal and len(ok) == len(rows))}
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    out["how"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                  "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()], "checkpoint": checkpoint or "shipped",
                  "mode": mode or "server default", "poll_interval_s": poll_interval_s, "gate": "store",
                  "warmup_documents": WARMUP_DOCS, "method": run_feed.__doc__.split("Feed mode: ")[1].strip()}
    return out


def feed_table(result: dict) -> str:
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    t, s, o = result["ttq_s"], result["in_store_s"], result["on_topic_s"]
    return ("| feed interval s | stories | queryable | ttq p50 | p90 | p99 | max | on topic p50 / p99 "
            f"| in store p50 / p99 | goal p99 ≤ interval + {FEED_SLACK_S:g} s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            f"| {result['interval_s']:g} | {result['documents']} | {result['queryable']}/{result['documents']} | "
            f"{f(t['p50'])} | {f(t['p90'])} | {f(t['p99'])} | {f(t['max'])} | {f(o['p50'])} / {f(o['p99'])} | "
            f"{f(s['p50'])} / {f(s['p99'])} | {'met' if result['goal']['met'] else 'NOT met'} |")
