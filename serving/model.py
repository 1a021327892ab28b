"""The model deployment: retrieve → aggregate → generate, batched across requests with ``@serve.batch``.

A replica loads its checkpoint before it takes traffic; one that cannot load stays up and reports why on /ready (503)
instead of crash-looping. It reads only the collection of its own checkpoint version, and the aggregator refuses any
modulation of another version (``CheckpointMismatch``). ``reconfigure`` (a changed ``checkpoint`` in the user config)
loads the new model beside the old one and swaps them between batches, so no request is dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict

from ray import serve
from ray.serve.exceptions import RayServeException

from pipeline.memory import Hit
from pipeline.store import SearchFilter, collection_name

log = logging.getLogger(__name__)
PEAK_WINDOW_S = 2.0  # how long the replica remembers its peak concurrency when sizing batches


def _replicas() -> int:
    """Replicas of this deployment (1 outside a replica)."""
    try:
        return max(1, serve.get_replica_context().world_size)
    except RayServeException:  # not in a replica
        return 1


def _fallback(used: str, job: dict) -> str | None:
    return "no document matched the filters" if used == "base" and job["mode"] != "base" else None


class NotReady(RuntimeError):
    """The replica has not loaded its model yet (→ 503)."""


class _Loaded:
    def __init__(self, checkpoint: str | None, threads: int):
        import torch

        from pipeline.mac import MACModel, checkpoint_dir

        torch.set_num_threads(threads)
        self.model = MACModel.load(checkpoint_dir(checkpoint)).eval()
        self.checkpoint = checkpoint
        self.collection = collection_name(self.model.version)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=5)
class MACServer:
    def __init__(self, store: str, threads: int, max_batch_size: int, batch_wait_timeout_s: float):
        """Only what the replica needs: gateway settings (keys, limits) can change without restarting replicas."""
        from workers.store_actor import connect_store

        self.threads = threads
        self.store = connect_store(store)
        self.loaded: _Loaded | None = None
        self.error: str | None = None
        self.max_batch_size, self.inflight, self.peak, self.peak_at = max_batch_size, 0, 0, 0.0
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._lock = threading.Lock()

    def _load(self, checkpoint: str | None) -> None:
        try:
            loaded = _Loaded(checkpoint, self.threads)
            with self._lock:
                self.loaded, self.error = loaded, None
            log.info("replica ready: checkpoint %s", loaded.model.version)
        except Exception as err:  # noqa: BLE001 - reported on /ready, not a crash loop
            self.error = f"{type(err).__name__}: {err}"
            log.exception("loading the checkpoint failed")

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this after __init__ and whenever the user config changes (no replica restart).

        First call: load the checkpoint before the replica counts as started, so Serve routes nothing to it (and a
        rolling restart keeps the old replica) until it can answer. A checkpoint that fails to load leaves the replica
        up but not ready: /ready and every request say why with a 503. Later calls with another checkpoint load it
        beside the old one, then swap; batches in flight finish on the old model, so a rollout drops no request.
        """
        checkpoint = user_config.get("checkpoint")
        if self.loaded is None or checkpoint != self.loaded.checkpoint:
            self._load(checkpoint)

    # ---- status ---------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        cur = self.loaded
        return {"ready": cur is not None, "checkpoint": cur.model.version if cur else None,
                "collection": cur.collection if cur else None, "error": self.error}

    def memory_stats(self, tenant: str | None = None) -> dict:
        """Counts and newest publication time of the served collection; with ``tenant`` (an API key's), only that
        tenant's documents: a key never learns how much another tenant stored."""
        cur = self._current()
        newest = self.store.newest_published(cur.collection, tenant)
        return {"checkpoint": cur.model.version, "collection": cur.collection, **self.store.counts(cur.collection, tenant),
                "newest_published_at": newest.isoformat() if newest else None}

    def _current(self) -> _Loaded:
        cur = self.loaded
        if cur is None:
            raise NotReady(self.error or "the model is still loading")
        return cur

    # ---- answering -------------------------------------------------------------------------------------------------
    def _retrieve(self, cur: _Loaded, jobs: list[dict]) -> tuple[list[list[Hit]], float]:
        """Embed every question at once; one store query per distinct (filter, top_k), not per request."""
        t0 = time.perf_counter()
        need = [i for i, j in enumerate(jobs) if j["mode"] != "base"]
        hits: list[list[Hit]] = [[] for _ in jobs]
        if need:
            vecs = cur.model.encoder.embed([jobs[i]["question"] for i in need]).numpy()
            groups: dict[str, list[int]] = defaultdict(list)
            for row, i in enumerate(need):
                groups[json.dumps([jobs[i]["filter"], jobs[i]["top_k"]], sort_keys=True, default=str)].append(row)
            for rows in groups.values():
                first = jobs[need[rows[0]]]
                flt = SearchFilter(**first["filter"]) if first["filter"] else None
                for row, h in zip(rows, self.store.search(cur.collection, vecs[rows], first["top_k"], flt)):
                    hits[need[row]] = h
        return hits, (time.perf_counter() - t0) / max(1, len(jobs))

    @staticmethod
    def _sources(hits: list[Hit], weights: dict[str, float]) -> list[dict]:
        best: dict[str, Hit] = {}
        for h in hits:  # best first: one source per document, at its best chunk's score
            best.setdefault(h.document.id, h)
        return [{"id": d.document.id, "title": d.document.title, "url": d.document.url,
                 "published_at": d.document.published_at.isoformat() if d.document.published_at else None,
                 "score": round(d.score, 4), "weight": weights.get(d.document.id)} for d in best.values()]

    async def submit(self, job: dict) -> dict:
        """One /v1/answer request into the batcher, with a load-adaptive batch size.

        A batch closes when it holds as many requests as are in flight for this replica at their recent peak (capped
        at max_batch_size), or when the wait timeout passes. A lone client therefore never waits for a batch that
        cannot fill, while concurrent clients are answered together. Without this, a closed loop of 8 clients
        settles into alternating half-batches of 4: each batch starts with whatever queued while the last one ran.
        (Serve reads the size when a batch starts.)

        The load is the larger of this replica's own count and the gateway's (``job["load"]``: batched requests in
        flight through the gateway, over the deployment's replicas). The replica's own count alone is not enough: a
        generation blocks its loop, so requests that arrive meanwhile are counted only after the batch ends, and a
        half-batch pattern would look like a load of 4 and keep itself going.
        """
        gateway_load = -(-int(job.pop("load", 1)) // _replicas())  # ceil: several gateways would undercount (safe)
        self.inflight += 1
        load, now = max(self.inflight, gateway_load), time.monotonic()
        if load >= self.peak or now - self.peak_at > PEAK_WINDOW_S:  # recent peak concurrency
            self.peak, self.peak_at = load, now
        try:
            self.answer.set_max_batch_size(max(1, min(self.max_batch_size, self.peak)))
            return await self.answer(job)
        finally:
            self.inflight -= 1

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def answer(self, jobs: list[dict]) -> list[dict]:
        """jobs: {question, mode, top_k, max_new_tokens, filter}. The compute runs on the event loop on purpose: Serve
        forms the next batch while one runs, so a free loop would close small batches on the wait timeout; with the loop
        busy, everything that queued during a generation forms the next batch. One generation per (mode, length) group."""
        from pipeline.answering import answer, mode_spec

        try:
            cur = self._current()
        except NotReady as err:
            return [{"error": "not_ready", "message": str(err)}] * len(jobs)
        hits, t_ret = self._retrieve(cur, jobs)
        groups = defaultdict(list)
        for i, j in enumerate(jobs):
            mode = mode_spec(j["mode"], j.get("context_docs")) if (j["mode"] == "base" or hits[i]) else "base"  # nothing matched: no memory
            groups[(mode, j["max_new_tokens"])].append(i)
        out: list[dict] = [{} for _ in jobs]
        for (mode, max_new), idx in groups.items():
            answers = answer(cur.model, mode, [jobs[i]["question"] for i in idx], [hits[i] for i in idx], max_new)
            for i, a in zip(idx, answers):
                out[i] = {"answer": a.text, "mode": jobs[i]["mode"], "checkpoint": cur.model.version,
                          "sources": self._sources(hits[i], a.weights),
                          "fallback": _fallback(mode, jobs[i]),
                          "timings": {"retrieve": t_ret, **a.seconds}, "batch_size": len(jobs)}
        return out

    async def stream(self, job: dict):
        """Yield the sources first, then the answer text piece by piece (greedy, one request, unbatched). The pieces
        concatenate to what :meth:`answer` returns for the same request."""
        from pipeline.answering import citation_weights, mode_spec, prepare

        cur = self._current()
        hits, _ = self._retrieve(cur, [job])
        mode = mode_spec(job["mode"], job.get("context_docs")) if (job["mode"] == "base" or hits[0]) else "base"
        prompts, prefix, mass = prepare(cur.model, mode, [job["question"]], hits)
        weights = citation_weights(hits[0], mass[0]) if mass is not None else {}
        yield {"sources": self._sources(hits[0], weights), "checkpoint": cur.model.version,
               "fallback": _fallback(mode, job)}
        tok = cur.model.lm.tokenizer
        ids, sent = [], ""
        for t in cur.model.lm.stream(tok(prompts[0])["input_ids"], prefix, job["max_new_tokens"]):
            ids.append(t)
            full = tok.decode(ids).lstrip()
            # hold back a piece that ends inside a multi-byte character (decoded as U+FFFD until complete)
            if len(full) > len(sent) and full.startswith(sent) and not full.endswith("\ufffd"):
                yield {"delta": full[len(sent):]}
                sent = full
