"""``macstream bench serve``: latency per mode and batching throughput of the real HTTP service, side by side.

How it is measured (printed with the results): one Ray Serve app (one model replica, ``replica_threads`` torch
threads) over an embedded store holding the synthetic test split (40–90-word articles) or, with ``docs="realtimeqa"``,
RealTimeQA 2022 news (real-length articles of several 256-token windows: the search results that come with its
questions) encoded by the checkpoint. The same LM, the same top_k and the same max_new_tokens for every mode.
Each mode answers the same questions from one client, one
request at a time (p50/p99 latency, requests/s); then MAC answers them 4 times over from 1 and from ``clients``
concurrent clients (throughput ratio: what request batching buys). Every client is a thread with its own keep-alive
HTTP connection, in the benchmark's process. Warm-up requests are not counted.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import requests

from benchmarks.machine import machine
from pipeline.cluster import init_ray
from pipeline.config import ServeConfig
from pipeline.data import realtimeqa
from pipeline.data.synthetic import generate
from pipeline.model.mac import MACModel, checkpoint_dir
from pipeline.modes import Mode
from pipeline.prompts import document_text
from pipeline.store import collection_name
from pipeline.store.actor import connect_store
from serving.app import start
from workers.broker import free_port
from workers.messages import content_hash

MODES = ("base", "mac", "rag", "mac+rag", "rag@1", "mac+rag@1", "select+rag@1")
THROUGHPUT_ROUNDS = 4  # the throughput phases ask every question this many times: long enough for a steady state


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _corpus(docs: str, entities: int) -> tuple[list, list]:
    """(documents, questions): the synthetic test split of ``entities`` companies, or real-length news: the first
    ``entities`` RealTimeQA 2022 questions that come with the news articles a search engine returned for them, and
    those articles (whole, several 256-token windows each) plus their evidence snippets."""
    if docs == "synthetic":
        return generate("test", entities, seed=0)
    if not realtimeqa.available():
        raise FileNotFoundError(f"RealTimeQA not found at {realtimeqa.default_root()} (set MACSTREAM_RTQA_DIR)")
    all_docs, questions = realtimeqa.load([2022], with_search_results=True)
    searched = {d.id.split("-gcs")[0] for d in all_docs if "-gcs" in d.id}
    questions = [q for q in questions if q.id in searched][:entities]
    asked = {q.id for q in questions}
    gold = {d for q in questions for d in q.doc_ids or ()}
    return [d for d in all_docs if d.id.split("-gcs")[0] in asked or d.id in gold], questions


def _body(question: str, mode: str, top_k: int, max_new_tokens: int) -> dict:
    m = Mode.parse(mode)
    return {"question": question, "mode": m.kind, "top_k": top_k, "max_new_tokens": max_new_tokens,
            **({"context_docs": m.context_docs} if m.context_docs else {})}


def _fill(location: str, checkpoint: str | None, entities: int,
          docs_kind: str = "synthetic") -> tuple[list[str], int, float]:
    """Encode and store the corpus; return its questions, its document count and its mean prompt tokens per document."""
    from collections import defaultdict

    docs, questions = _corpus(docs_kind, entities)
    model = MACModel.load(checkpoint_dir(checkpoint)).eval()
    store, coll = connect_store(location), collection_name(model.version)
    by_doc = defaultdict(list)
    for c in model.encode_documents(docs):
        by_doc[c.modulation.doc_id].append(c)
    for d in docs:
        store.upsert(coll, d, content_hash(d), by_doc[d.id])
    tokens = statistics.mean(len(model.lm.tokenizer(document_text(d))["input_ids"]) for d in docs)
    return [q.question for q in questions], len(docs), tokens


def batch_counts(base: str) -> tuple[float, float]:
    """(sum, count) of the gateway's macstream_batch_size histogram."""
    text = requests.get(base + "/metrics", timeout=30).text
    vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("macstream_batch_size_")}
    return vals.get("macstream_batch_size_sum", 0.0), vals.get("macstream_batch_size_count", 0.0)


def run(checkpoint: str | None = None, entities: int = 40, requests_per_mode: int = 40, clients: int = 8,
        top_k: int = 8, max_new_tokens: int = 16, batch_wait_s: float | None = None, replica_threads: int = 1,
        docs: str = "synthetic", throughput: bool = True) -> dict:
    """``batch_wait_s`` None: the ServeConfig default. ``docs``: "synthetic" or "realtimeqa" (``entities`` is then
    the number of questions). ``throughput`` False skips the batching phases (latency per mode only)."""
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    store_dir = tempfile.mkdtemp(prefix="macstream-bench-")
    wait = {} if batch_wait_s is None else {"batch_wait_timeout_s": batch_wait_s}
    cfg = ServeConfig(port=free_port(), checkpoint=checkpoint, store=str(Path(store_dir) / "store"),
                      max_batch_size=clients, max_pending=1000, replica_threads=replica_threads, **wait)
    t0 = time.perf_counter()
    questions, n_docs, doc_tokens = _fill(cfg.store_location(), checkpoint, entities, docs)
    fill_s = time.perf_counter() - t0
    start(cfg)
    base = f"http://127.0.0.1:{cfg.port}"
    while requests.get(base + "/ready", timeout=30).status_code != 200:
        time.sleep(0.2)
    qs = (questions * (1 + requests_per_mode // max(1, len(questions))))[:requests_per_mode]

    stages: dict[str, list[dict]] = {m: [] for m in MODES}
    local = threading.local()  # one keep-alive HTTP session per client thread, as a real client keeps its connection

    def ask(q: str, mode: str) -> float:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        t = time.perf_counter()
        r = local.session.post(base + "/v1/answer", json=_body(q, mode, top_k, max_new_tokens), timeout=600)
        r.raise_for_status()
        stages[mode].append(r.json()["timings"])
        return time.perf_counter() - t

    result: dict = {"modes": {}, "throughput": {}}
    for mode in MODES:
        for q in qs[:3]:
            ask(q, mode)  # warm-up
        t = time.perf_counter()
        lat = [ask(q, mode) for q in qs]
        wall = time.perf_counter() - t
        server = {k: statistics.mean(t[k] for t in stages[mode][3:]) for k in stages[mode][-1]}
        result["modes"][mode] = {"p50_s": statistics.median(lat), "p99_s": _pct(lat, 0.99),
                                 "requests_per_s": len(lat) / wall, "requests": len(lat), "server_seconds": server,
                                 "latencies_s": lat}
    for n in (1, clients) if throughput else ():
        s0, c0 = batch_counts(base)
        t = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda q: ask(q, "mac"), qs * THROUGHPUT_ROUNDS))
        result["throughput"][f"{n}_clients_requests_per_s"] = THROUGHPUT_ROUNDS * len(qs) / (time.perf_counter() - t)
        s1, c1 = batch_counts(base)
        result["throughput"][f"{n}_clients_mean_batch_size"] = (s1 - s0) / max(1.0, c1 - c0)
    serve.shutdown()
    m = result["modes"]
    result["ratios"] = {
        "mac_p50_over_rag_p50": m["mac"]["p50_s"] / m["rag"]["p50_s"],
        "mac_p50_over_base_p50": m["mac"]["p50_s"] / m["base"]["p50_s"],
        "mac+rag@1_p50_over_rag_p50": m["mac+rag@1"]["p50_s"] / m["rag"]["p50_s"],
    }
    result["targets"] = {"mac_p50 <= 0.5 x rag_p50": result["ratios"]["mac_p50_over_rag_p50"] <= 0.5,
                         "mac_p50 <= 1.3 x base_p50": result["ratios"]["mac_p50_over_base_p50"] <= 1.3}
    if throughput:
        tp = result["throughput"]
        ratio = tp[f"{clients}_clients_requests_per_s"] / tp["1_clients_requests_per_s"]
        result["ratios"][f"throughput_{clients}_clients_over_1"] = ratio
        result["targets"][f"throughput {clients} clients >= 2 x 1 client"] = ratio >= 2
    result["how"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "checkpoint": checkpoint or "shipped", "documents": n_docs,
        "corpus": docs, "mean_document_tokens": doc_tokens,
        "store": "embedded qdrant-client (local mode) via the store-owner actor", "top_k": top_k,
        "max_new_tokens": max_new_tokens, "requests_per_mode": len(qs), "clients": clients,
        "replicas": cfg.replicas, "replica_threads": cfg.replica_threads, "max_batch_size": cfg.max_batch_size,
        "batch_wait_s": cfg.batch_wait_timeout_s,
        "fill_seconds": fill_s, "method": __doc__.split("How it is measured (printed with the results): ")[1].strip(),
    }
    return result


def table(result: dict) -> str:
    lines = ["| mode | p50 s | p99 s | requests/s | server: retrieve / aggregate / generate s |",
             "| --- | --- | --- | --- | --- |"]
    for mode, r in result["modes"].items():
        st = r["server_seconds"]
        lines.append(f"| {mode} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['requests_per_s']:.2f} | "
                     f"{st['retrieve']:.3f} / {st['aggregate']:.3f} / {st['generate']:.3f} |")
    lines.append("")
    for k, v in result["throughput"].items():
        lines.append(f"- {k.replace('_', ' ')}: {v:.2f}")
    lines.append("- (mean batch size: over requests, the size of the batch each request was answered in)")
    for k, v in result["ratios"].items():
        lines.append(f"- {k}: {v:.2f}")
    for k, v in result["targets"].items():
        lines.append(f"- target {k}: {'met' if v else 'NOT met'}")
    return "\n".join(lines)
