"""``make demo``: the whole system on real components, on embedded defaults, in a few minutes on 2 CPU cores.

1. Start the local Kafka-protocol broker (Tansu), a local Ray cluster, the ingest job (consumer + encoder actors
   writing an embedded Qdrant store) and the Ray Serve HTTP app on a free port.
2. Stream a news feed into Kafka: the synthetic stream about fictional companies (entities never seen in training)
   and, when ``../shared/data/realtimeqa`` is present, a week of RealTimeQA 2024 news. A few articles are held back.
3. Ask those articles' questions over HTTP *before* they arrive, publish them, wait until the memory has them (seconds),
   and ask again: answers and cited sources side by side with the base LM's.
4. A short quality and speed table over held-out questions (answered over HTTP), then a clean shutdown (no processes
   left behind) and how to run each part alone.

With ``feed=True`` (``macstream demo --feed``) the held-back articles arrive the way live news does: they appear as
pages and items of an RSS feed on a local web server (127.0.0.1), and the feed poller (workers/feeds.py, polling
every second) fetches them, extracts their text and produces them to the topic.

Everything runs in a throw-away data directory; nothing persists after the demo.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from benchmarks.feed_server import Story, article, rss
from pipeline.cluster import init_ray
from pipeline.config import DEFAULT_MODE, IngestConfig, ServeConfig
from pipeline.data import realtimeqa, synthetic
from pipeline.metrics import aggregate, score_answer
from pipeline.modes import Mode
from serving.app import start
from workers import kafka_io
from workers.broker import LocalBroker, free_port
from workers.ingest import IngestJob

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHOW_MODES = ("base", "rag", "mac", "mac+rag", DEFAULT_MODE)  # the last: what a client that names no mode gets
TABLE_MODES = SHOW_MODES
CLIENTS = 4


def _post(base: str, question: str, mode: str, top_k: int = 4) -> tuple[dict, float]:
    import requests

    t = time.perf_counter()
    m = Mode.parse(mode)
    body = {"question": question, "mode": m.kind, "top_k": top_k, "max_new_tokens": 16}
    r = requests.post(f"{base}/v1/answer", json=body | ({"context_docs": m.context_docs} if m.context_docs else {}),
                      timeout=300)
    r.raise_for_status()
    return r.json(), time.perf_counter() - t


def _wait(what: str, check, timeout: float, total: int | None = None) -> float:
    """Poll ``check() -> int`` until it reaches ``total`` (or is truthy); a progress bar; returns seconds waited."""
    from tqdm import tqdm

    t0 = time.monotonic()
    with tqdm(total=total, desc=what, leave=False, dynamic_ncols=True) as bar:
        while time.monotonic() - t0 < timeout:
            n = check()
            if total is not None:
                bar.n = min(n, total)
                bar.refresh()
            if (n >= total) if total is not None else n:
                return time.monotonic() - t0
            time.sleep(0.25)
    raise TimeoutError(f"{what}: not done after {timeout:.0f}s")


def _feed(realtimeqa_weeks: int = 1):
    """(documents, questions, held-back documents): synthetic test stream + a RealTimeQA 2024 week when present."""
    docs, questions = synthetic.generate("test", 24, seed=7)
    rng = random.Random(7)
    late = rng.sample(docs, 3)
    if realtimeqa.available():
        r_docs, r_qs = realtimeqa.load([2024])
        weeks = sorted({d.id.split("_")[0] for d in r_docs})[:realtimeqa_weeks]
        r_docs = [d for d in r_docs if d.id.split("_")[0] in weeks]
        ids = {d.id for d in r_docs}
        # free-form questions only ("Which of the following ..." needs its choices on screen)
        r_qs = [q for q in r_qs if q.doc_ids and set(q.doc_ids) <= ids and "following" not in q.question.lower()]
        if r_qs:
            late.append(next(d for d in r_docs if d.id == r_qs[0].doc_ids[0]))
        docs, questions = docs + r_docs, questions + r_qs
    return docs, questions, late


def _show(q, before: dict, after: dict) -> None:
    print(f"\nQ: {q.question}\n   gold answer: {q.answers[0]}")
    for mode in SHOW_MODES:
        b, a = before[mode], after[mode]
        ok_b, ok_a = (score_answer(x["answer"], q.answers)["em"] == 1.0 for x in (b, a))  # exact (normalised) match
        line = f"   {mode:9} before: {b['answer'][:38]!r:42} {'✓' if ok_b else '✗'}"
        if mode != "base":
            line += f"   after: {a['answer'][:38]!r:42} {'✓' if ok_a else '✗'}"
        print(line)
    src = after["mac+rag"]["sources"]
    if src:
        top = max(src, key=lambda s: s.get("weight") or 0)
        print(f"   top source after arrival: {top['title'] or top['url'] or top['id']!r} "
              f"({(top.get('published_at') or '')[:10]}), "
              f"retriever score {top['score']:.2f}, aggregator weight {top.get('weight') or 0:.2f}")


def _publish_in_feed(site, docs) -> None:
    """Each document as an article page and an item of the site's RSS feed (newest first), published at once."""
    from datetime import UTC, datetime

    stories = []
    for i, d in enumerate(docs):
        path = f"/news/{i}-{d.id}.html"
        site.put(path, article(d.title or d.id, d.text.split("\n"), d.published_at))
        stories.append(Story(d.title or d.id, site.url(path), d.published_at or datetime.now(UTC)))
    site.put("/feed.xml", rss("macstream demo wire", site.base, stories), "application/rss+xml")


def main(feed: bool = False) -> None:
    import ray
    import requests
    from ray import serve

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    t_start = time.monotonic()
    data_dir = tempfile.mkdtemp(prefix="macstream-demo-")  # the store; the model cache stays in MACSTREAM_HOME
    store = os.path.join(data_dir, "store")
    stop = threading.Event()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, data_dir, True)
        print("[1/4] starting the local broker (Tansu), Ray, the ingest job and the Serve app ...")
        broker = stack.enter_context(LocalBroker())
        topic = "news"
        init_ray()
        stack.callback(ray.shutdown)
        job = IngestJob(IngestConfig(topic=topic, bootstrap_servers=broker.bootstrap, workers=1, batch_size=16,
                                     store=store), partitions=2, progress=False).start()

        def supervise() -> None:  # what `macstream ingest` does in its main loop: replace dead consumers
            while not stop.wait(0.5):
                job.supervise()

        supervisor = threading.Thread(target=supervise, daemon=True)
        supervisor.start()
        cfg = ServeConfig(port=free_port(), store=store)
        start(cfg)
        stack.callback(serve.shutdown)
        if feed:  # a local news site and the feed poller (stopped first on the way out)
            from benchmarks.feed_server import FeedSite
            from pipeline.config import FeedsConfig
            from workers.feeds import FeedPoller

            site = stack.enter_context(FeedSite())
            site.put("/feed.xml", rss("macstream demo wire", site.base, []), "application/rss+xml")
            stack.enter_context(FeedPoller(FeedsConfig(
                sources=[site.url("/feed.xml")], topic=topic, bootstrap_servers=broker.bootstrap, interval=1.0,
                per_host_delay=0.0, state_dir=os.path.join(data_dir, "feeds"))))
        base = f"http://127.0.0.1:{cfg.port}"
        _wait("model replica loading", lambda: requests.get(base + "/ready", timeout=30).status_code == 200, 300)

        def documents() -> int:
            return requests.get(base + "/v1/memory/stats", timeout=30).json()["documents"]

        docs, questions, late = _feed()
        late_ids = {d.id for d in late}
        asked = [next(q for q in questions if q.doc_ids and q.doc_ids[0] == d.id) for d in late]
        early = [d for d in docs if d.id not in late_ids]
        print(f"[2/4] streaming {len(early)} articles through Kafka topic {topic!r} "
              f"({len(docs) - len(early)} held back) ...")
        t0 = time.monotonic()
        kafka_io.produce(broker.bootstrap, topic, early)
        _wait("ingest (documents in the store)", documents, 600, total=len(early))
        ingest_s = time.monotonic() - t0

        print(f"[3/4] asking about the {len(late)} held-back articles before and after they arrive")
        before = {q.id: {m: _post(base, q.question, m)[0] for m in SHOW_MODES} for q in asked}
        t0 = time.monotonic()
        if feed:
            _publish_in_feed(site, late)
        else:
            kafka_io.produce(broker.bootstrap, topic, late)
        _wait("the new articles arrive", documents, 300, total=len(docs))
        fresh_s = time.monotonic() - t0
        after = {q.id: {m: _post(base, q.question, m)[0] for m in SHOW_MODES} for q in asked}
        for q in asked:
            _show(q, before[q.id], after[q.id])
        print(f"\n   the new articles were answerable {fresh_s:.1f}s after they were "
              f"{'in the RSS feed (polled every 1 s)' if feed else 'published to Kafka'} "
              f"(no gradient step: one amortizer forward each)")

        print("\n[4/4] quality and speed over held-out questions (HTTP, top-k 4, all articles in memory)")
        from tqdm import tqdm

        held = [q for q in questions if q.doc_ids and q.doc_ids[0] not in late_ids][:CLIENTS * 3]
        rows = {m: [] for m in TABLE_MODES}
        for m in TABLE_MODES:  # CLIENTS concurrent requests per mode: the replica answers them in batches
            with ThreadPoolExecutor(CLIENTS) as pool:
                answers = pool.map(lambda q, m=m: _post(base, q.question, m), held)
                for q, (r, secs) in zip(held, tqdm(answers, total=len(held), desc=f"asking ({m})", leave=False,
                                                   dynamic_ncols=True)):
                    rows[m].append({**score_answer(r["answer"], q.answers), "seconds": secs})
        print(f"   {'mode':9} {'EM':>6} {'F1':>6} {'p50 s':>7}   ({len(held)} questions, {CLIENTS} concurrent clients)")
        for m, rs in rows.items():
            s = aggregate({k: v for k, v in r.items() if k in ('em', 'f1')} for r in rs)
            print(f"   {m:9} {s['em']:6.1f} {s['f1']:6.1f} {statistics.median(r['seconds'] for r in rs):7.2f}")
        snap = job.snapshot()
        print(f"   ingest: {snap['upserted']} documents written, {snap['dead_lettered']} dead-lettered; "
              f"{len(early)} articles stored in {ingest_s:.1f}s with 1 encoder worker")
        stop.set()
        supervisor.join(5)
        job.stop()
    print(f"\ndone in {time.monotonic() - t_start:.0f}s; broker, Ray and Serve are shut down.")
    print("""
Run each part alone (see README):
  macstream broker --port 9092                              # local Kafka-protocol broker
  macstream produce --topic news synthetic --split test     # publish a news stream
  macstream feeds feeds.txt --topic news                    # or poll live RSS/Atom/JSON feeds into it
  macstream ingest --topic news --workers 2                 # Kafka -> Ray encoder workers -> Qdrant
  macstream serve --port 8000                               # HTTP API on Ray Serve
  curl -s localhost:8000/v1/answer -d '{"question": "...", "mode": "mac+rag"}' -H 'content-type: application/json'
  macstream eval --data DIR --modes base,mac,rag,mac+rag    # quality;  macstream bench all  # the benchmark report""")


if __name__ == "__main__":
    main(feed="--feed" in sys.argv[1:])
