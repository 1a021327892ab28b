"""The model deployment: retrieve → aggregate → generate, batched across requests with ``@serve.batch``.

A replica loads its checkpoint before it takes traffic; one that cannot load stays up and reports why on /ready (503)
instead of crash-looping. It reads only the collection of its own checkpoint version, and the aggregator refuses any
modulation of another version (``CheckpointMismatch``). ``reconfigure`` (a changed ``checkpoint`` in the user config)
loads the new model beside the old one and swaps them between batches, so no request is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import NamedTuple

import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from pipeline.answering import answer, citation_weights, prepare
from pipeline.model.mac import MACModel, QuestionEncoding, assigned_device, checkpoint_dir
from pipeline.modes import BASE, Mode
from pipeline.schemas import Hit
from pipeline.store import collection_name
from pipeline.store.actor import StoreBusy, connect_store
from serving.schemas import AnswerJob, Usage

log = logging.getLogger(__name__)
PEAK_WINDOW_S = 2.0  # how long the replica remembers its peak concurrency when sizing batches


def _replicas() -> int:
    """Replicas of this deployment (1 outside a replica)."""
    try:
        return max(1, serve.get_replica_context().world_size)
    except RayServeException:  # not in a replica
        return 1


def _fallback(used: Mode, job: AnswerJob) -> str | None:
    return "no document matched the filters" if used == BASE and job.mode != BASE else None


class _Unreachable:
    """Stands in for a store this replica could not connect to: every call raises with the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name: str):
        def fail(*_args, **_kwargs):
            raise RuntimeError(self.reason)

        return fail


class _Encoded(NamedTuple):
    """The memory jobs' questions encoded once (:meth:`MACModel.encode_questions`), and each job's row in it."""

    enc: QuestionEncoding | None
    row: dict[int, int]  # job index → row

    def of(self, jobs: list[int]) -> QuestionEncoding:
        return self.enc.select([self.row[i] for i in jobs])


class NotReady(RuntimeError):
    """The replica cannot answer yet: its model is loading or failed to load, or its store does not answer (→ 503)."""


def _reason(err: BaseException) -> str:
    """One line for a client: the innermost cause's message, without a Ray traceback."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if "store " in ln or "Error" in ln.split(":")[0]]
    return (named or lines or [type(err).__name__])[-1][:500]


class _Loaded:
    def __init__(self, checkpoint: str | None, threads: int):
        torch.set_num_threads(threads)
        # the GPU Ray assigned this replica (ServeConfig.replica_gpus) when torch can use it, else the CPU
        self.device = assigned_device(ray.get_gpu_ids() if ray.is_initialized() else [])
        self.model = MACModel.load(checkpoint_dir(checkpoint)).eval()
        if self.device.type != "cpu":
            self.model.to_device(self.device)  # the frozen LM in bf16 (fp16 where bf16 is unsupported)
        self.checkpoint = checkpoint
        self.collection = collection_name(self.model.version)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=5)
class MACServer:
    def __init__(self, store: str, threads: int, max_batch_size: int, batch_wait_timeout_s: float):
        """Only what the replica needs: gateway settings (keys, limits) can change without restarting replicas."""
        self.threads = threads
        self.location = store
        try:
            self.store = connect_store(store)
        except StoreBusy as err:  # up, never ready: /ready and every request say why (503), no crash loop
            self.store = _Unreachable(str(err))
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
    def _store_error(self) -> str | None:
        """None when the store answers a cheap call; else why not (e.g. the embedded store is owned by another
        process), for /ready and every 503."""
        try:
            self.store.collections()
            return None
        except Exception as err:  # noqa: BLE001 - any failure to reach the store makes the replica not ready
            return f"store {self.location} does not answer: {_reason(err)}"

    def status(self) -> dict:
        """Ready only when the model is loaded *and* the store answers."""
        cur = self.loaded
        error = self.error or (None if cur is None else self._store_error())
        return {"ready": cur is not None and error is None, "checkpoint": cur.model.version if cur else None,
                "answer_prompt": cur.model.prompt_version if cur else None,  # select+rag's prefix (not in the version)
                "collection": cur.collection if cur else None, "error": error}

    def memory_stats(self, tenant: str | None = None) -> dict:
        """Counts and newest publication time of the served collection; with ``tenant`` (an API key's), only that
        tenant's documents: a key never learns how much another tenant stored. ``{"error": ...}`` when it cannot."""
        try:
            cur = self._current()
            newest = self.store.newest_published(cur.collection, tenant)
            counts = self.store.counts(cur.collection, tenant)
        except NotReady as err:
            return {"error": "not_ready", "message": str(err)}
        except Exception as err:  # noqa: BLE001 - the store failed: the client gets a 503 with the reason
            return {"error": "store_unavailable", "message": f"store {self.location}: {_reason(err)}"}
        return {"checkpoint": cur.model.version, "collection": cur.collection, **counts,
                "newest_published_at": newest.isoformat() if newest else None}

    def _current(self) -> _Loaded:
        cur = self.loaded
        if cur is None:
            raise NotReady(self.error or "the model is still loading")
        return cur

    # ---- answering -------------------------------------------------------------------------------------------------
    def _retrieve(self, cur: _Loaded, jobs: list[AnswerJob]) -> tuple[list[list[Hit]], _Encoded, float]:
        """Encode every question that uses memory once (MiniLM + the question head): the retrieval vectors query the
        store, and the same encoding later conditions the aggregator. One store query per distinct (filter, top_k).
        Returns per-job hits, the encoding of the memory jobs and the per-job share of the time."""
        t0 = time.perf_counter()
        need = [i for i, j in enumerate(jobs) if j.mode.uses_memory]
        hits: list[list[Hit]] = [[] for _ in jobs]
        encoded = _Encoded(None, {})
        if need:
            with torch.no_grad():
                # tokens (N, T, D), vectors (N, d_enc)
                enc = cur.model.encode_questions([jobs[i].question for i in need])
            vecs = enc.vectors.numpy()
            encoded = _Encoded(enc, {i: row for row, i in enumerate(need)})
            groups: dict[str, list[int]] = defaultdict(list)
            for row, i in enumerate(need):
                groups[jobs[i].group_key()].append(row)
            for rows in groups.values():
                first = jobs[need[rows[0]]]
                for row, h in zip(rows, self.store.search(cur.collection, vecs[rows], first.top_k, first.filter)):
                    hits[need[row]] = h
        return hits, encoded, (time.perf_counter() - t0) / max(1, len(jobs))

    @staticmethod
    def _sources(hits: list[Hit], weights: dict[str, float]) -> list[dict]:
        best: dict[str, Hit] = {}
        for h in hits:  # best first: one source per document, at its best chunk's score
            best.setdefault(h.document.id, h)
        return [{"id": d.document.id, "title": d.document.title, "url": d.document.url,
                 "published_at": d.document.published_at.isoformat() if d.document.published_at else None,
                 "score": round(d.score, 4), "weight": weights.get(d.document.id)} for d in best.values()]

    async def submit(self, job: AnswerJob) -> dict:
        """One /v1/answer request into the batcher, with a load-adaptive batch size.

        A batch closes when it holds as many requests as are in flight for this replica at their recent peak (capped
        at max_batch_size), or when the wait timeout passes. A lone client therefore never waits for a batch that
        cannot fill, while concurrent clients are answered together. Without this, a closed loop of 8 clients
        settles into alternating half-batches of 4: each batch starts with whatever queued while the last one ran.
        (Serve reads the size when a batch starts.)

        The load is the larger of this replica's own count and the gateway's (``job.load``: batched requests in
        flight through the gateway, over the deployment's replicas). The replica's own count alone is not enough: a
        generation blocks its loop, so requests that arrive meanwhile are counted only after the batch ends, and a
        half-batch pattern would look like a load of 4 and keep itself going.
        """
        gateway_load = -(-job.load // _replicas())  # ceil: several gateways would undercount (safe)
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
    async def answer(self, jobs: list[AnswerJob]) -> list[dict]:
        """The compute runs on the event loop on purpose: Serve forms the next batch while one runs, so a free loop
        would close small batches on the wait timeout; with the loop busy, everything that queued during a generation
        forms the next batch. One generation per (mode, length) group; a job whose retrieval found nothing is answered
        by the LM alone and says so (``fallback``)."""
        try:
            cur = self._current()
        except NotReady as err:
            return [{"error": "not_ready", "message": str(err)}] * len(jobs)
        try:
            hits, encoded, t_ret = self._retrieve(cur, jobs)
        except Exception as err:  # noqa: BLE001 - the store failed: every request of the batch gets a 503 with why
            log.warning("retrieval failed: %s", err)
            return [{"error": "store_unavailable", "message": f"store {self.location}: {_reason(err)}"}] * len(jobs)
        groups: dict[tuple[Mode, int], list[int]] = defaultdict(list)
        for i, j in enumerate(jobs):
            used = j.mode if (j.mode == BASE or hits[i]) else BASE  # nothing matched: no memory
            groups[(used, j.max_new_tokens)].append(i)
        out: list[dict] = [{} for _ in jobs]
        for (mode, max_new), idx in groups.items():
            enc = encoded.of(idx) if mode.uses_aggregator else None
            answers = answer(cur.model, mode, [jobs[i].question for i in idx], [hits[i] for i in idx], max_new, enc)
            for i, a in zip(idx, answers):
                out[i] = {"answer": a.text, "mode": str(jobs[i].mode), "checkpoint": cur.model.version,
                          "sources": self._sources(hits[i], a.weights),
                          "fallback": _fallback(mode, jobs[i]),
                          "timings": {"retrieve": t_ret, **a.seconds}, "batch_size": len(jobs),
                          "usage": Usage.of(a.prompt_tokens, a.completion_tokens).model_dump()}
        return out

    async def stream(self, job: AnswerJob):
        """Yield the sources first, then the answer text piece by piece (greedy, one request, unbatched), then the
        tokens it cost (``{"usage": ...}``, counted as in :meth:`answer`). The pieces concatenate to what
        :meth:`answer` returns for the same request."""
        cur = self._current()
        hits, encoded, _ = self._retrieve(cur, [job])
        mode = job.mode if (job.mode == BASE or hits[0]) else BASE
        prompts, prefix, mass = prepare(cur.model, mode, [job.question], hits,
                                        encoded.of([0]) if mode.uses_aggregator else None)
        weights = citation_weights(hits[0], mass[0]) if mass is not None else {}
        yield {"sources": self._sources(hits[0], weights), "checkpoint": cur.model.version,
               "fallback": _fallback(mode, job)}
        tok = cur.model.lm.tokenizer
        ids, sent, prompt_ids = [], "", tok(prompts[0])["input_ids"]
        for t in cur.model.lm.stream(prompt_ids, prefix, job.max_new_tokens):
            ids.append(t)
            full = tok.decode(ids).lstrip()
            # hold back a piece that ends inside a multi-byte character (decoded as U+FFFD until complete)
            if len(full) > len(sent) and full.startswith(sent) and not full.endswith("\ufffd"):
                yield {"delta": full[len(sent):]}
                sent = full
        yield {"usage": Usage.of(len(prompt_ids), len(ids)).model_dump()}
