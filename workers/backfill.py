"""The backfill job: an archive (Parquet or JSONL, read with Ray Data) → the ingest encoder actors → the store.

What it guarantees, the same as streaming ingest (workers/consumer.py), for a source read at rest:

- **Same records.** Every row is validated as a Kafka message would be (workers/archive.py); a bad row, a document
  the model cannot encode and one the store refuses go to the dead-letter Parquet file with their reason kind, never
  dropped. Documents are encoded by the same :class:`~workers.encoder.EncoderActor` pool as ingest (``workers``
  actors, ``gpus_per_worker`` each, fitted to the cluster by pipeline/placement.py) and written with the same
  idempotent point ids and content hashes to the same collection.
- **Last row wins.** A document that appears on several rows ends as its last valid row says (an update, or a
  delete). A first pass over the source finds that row for every id, so no other version is ever encoded, and
  exact duplicates are encoded once.
- **Resumable.** A document whose content hash the store already holds is not encoded again: a rerun after a crash
  (or over a source partly ingested from the topic) encodes only what is missing or changed. Writes are idempotent,
  so a crash at any point loses nothing a rerun does not redo and duplicates nothing.
- **Stops cleanly.** :attr:`BackfillJob.halt` (SIGTERM/Ctrl-C in the CLI) stops reading; encode calls in flight are
  written, the dead-letter file is closed, and the report says ``"complete": false``.

The report (:meth:`BackfillJob.snapshot`) has ingest's snapshot shape where it applies (records, upserted,
unchanged, deleted, chunks_written, dead_lettered, dlq_by_kind, elapsed_s, docs_per_s, batch latency, batches), plus
``superseded`` (rows a later row of the same document replaced), the dead-letter file and the source.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import threading
import time
from collections import Counter, deque

import ray

from pipeline.cluster import init_ray
from pipeline.config import BackfillConfig
from pipeline.model.mac import checkpoint_identity
from pipeline.schemas import Document, EncodeFailure
from pipeline.store import StoreRejection, collection_name
from pipeline.store.actor import connect_store
from workers import archive
from workers.ingest import start_encoders, stop_encoders
from workers.messages import Upsert

log = logging.getLogger(__name__)
DELETE = "-"  # the winner of a document whose last row deletes it
DONE = "!"  # prefix of a winner already applied in this pass
ROWS_PER_PULL = 256  # rows taken from Ray Data at a time (one store lookup each)
PROGRESS_EVERY_S = 2.0


class BackfillJob:
    """``start()`` then ``run()`` (returns the report). ``halt`` may be set from another thread or a signal handler."""

    def __init__(self, cfg: BackfillConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.version, self.model_id = checkpoint_identity(cfg.checkpoint)
        self.collection = collection_name(self.version)
        self.fmt, self.files, self.fs = archive.resolve(cfg.source, cfg.format)  # a bad source fails before Ray starts
        self.halt = threading.Event()
        self.counters: Counter = Counter()
        self.dlq_kinds: Counter = Counter()
        self.batch_seconds: deque[float] = deque(maxlen=1000)
        self.encoders: list = []
        self.encoder_cpus = 0.0  # what each encoder reserves (set when they start: fitted to the cluster)
        self.load: list[int] = []  # encode calls in flight per encoder
        self.inflight: dict = {}  # ref → (encoder index, submitted at, [(Upsert, path, line)])
        self.buffer: list[tuple[Upsert, str, int | None]] = []  # to encode, not yet submitted
        self.winners: dict[str, str] = {}  # id → content hash prefix (or DELETE) of its last valid row
        self.total_rows: int | None = None
        self.complete = False
        self.dead_letter_file: str | None = None
        self.dead = None
        self.plan_s: float | None = None
        self.started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> BackfillJob:
        """Connect the store, load the encoders and, while they load, run the first pass over the source (which row
        of each document wins). docs/s counts from when the encoders are ready, as ingest's does; the first pass
        counts only where it outlasts model loading."""
        init_ray()
        self.store = connect_store(self.cfg.store_location(), self.cfg.modulation_codec)
        args = (self.fmt, self.files, self.fs, self.cfg.read_tasks, self.cfg.max_message_bytes)
        self.ds = archive.dataset(*args)
        failed: list[BaseException] = []

        def plan() -> None:
            try:
                self._plan(archive.dataset(*args, columns=["id", "op", "hash", "kind"]))
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                failed.append(err)

        planner = threading.Thread(target=plan, name="backfill-plan", daemon=True)
        t0 = time.monotonic()
        planner.start()
        try:
            self.encoders, self.encoder_cpus = start_encoders(self.cfg, (self.version, self.model_id),
                                                              name="macstream-backfill-encoder")
        except BaseException:
            self.halt.set()  # the planner stops at its next batch
            raise
        self.started = time.monotonic()
        self.load = [0] * len(self.encoders)
        self.dead = archive.DeadLetters(self.cfg.dead_letter)
        log.info("backfill: %s (%s, %d file(s)) → %d encoders (%g CPU each) → %s [%s]", self.cfg.source, self.fmt,
                 len(self.files), len(self.encoders), self.encoder_cpus, self.cfg.store_location(), self.collection)
        planner.join()
        self.plan_s = time.monotonic() - t0
        if failed:
            self.stop()
            raise failed[0]
        return self

    def run(self) -> dict:
        """The second pass (encode and write); returns :meth:`snapshot`. Encoders are released whatever happens."""
        try:
            if not self.halt.is_set():
                self._apply(self.ds)
        finally:
            self.stop()
        return self.snapshot()

    def stop(self) -> None:
        if self.inflight:  # an error or a halt mid-pass: finish what is encoding (it is written, not lost)
            try:
                self._drain()
            except Exception as err:  # noqa: BLE001 - what was not written is encoded again by the next run
                log.warning("backfill: in-flight batches not written: %s", err)
        if self.dead is not None:
            self.dead_letter_file = self.dead.close()
            self.dead = None
        stop_encoders(self.encoders, self.encoder_cpus)
        self.encoders = []

    # ---- pass 1: the last valid row of every document --------------------------------------------------------------
    def _plan(self, ds) -> None:
        rows = 0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
            if self.halt.is_set():
                return
            cols = batch.to_pydict()
            for doc_id, op, h, kind in zip(cols["id"], cols["op"], cols["hash"], cols["kind"]):
                rows += 1
                if kind is None:
                    self.winners[doc_id] = DELETE if op == "delete" else h[:16]
        self.total_rows = rows
        log.info("backfill: %d rows, %d documents", rows, len(self.winners))

    # ---- pass 2: encode and write the winners ------------------------------------------------------------------------
    def _apply(self, ds) -> None:
        bar = self._bar()
        t_log = time.monotonic()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=ROWS_PER_PULL):
            if self.halt.is_set():
                break
            self._take(batch.to_pylist())
            self._dispatch()
            while len(self.buffer) >= self.cfg.batch_size and not self._free():  # backpressure: read no further
                self._collect(block=True)
                self._dispatch()
            self._collect(block=False)
            if bar is not None:
                bar.n = self.counters["records"]
                bar.set_postfix(self._postfix(), refresh=True)
            elif self.progress and time.monotonic() - t_log >= PROGRESS_EVERY_S:
                t_log = time.monotonic()
                log.info("backfill: %d/%s rows, %s", self.counters["records"], self.total_rows or "?", self._postfix())
        else:
            while self.buffer:  # the source is read: split what is left evenly, so no encoder idles at the end
                self._dispatch(final=True)
                if self.buffer:
                    self._collect(block=True)
            self._drain()
            self.complete = True
        if self.halt.is_set():
            log.info("backfill: stopped; %d documents read but not encoded are left to the next run", len(self.buffer))
            self.buffer = []
        self._drain()
        if bar is not None:
            bar.n = self.counters["records"]
            bar.set_postfix(self._postfix())
            bar.close()

    def _take(self, rows: list[dict]) -> None:
        """Route one pull of rows: bad → dead letters; superseded or duplicate → counted; deletes → applied; the
        rest → to encode, unless the store already holds the same content."""
        candidates: list[tuple[Upsert, str, int | None]] = []
        for r in rows:
            self.counters["records"] += 1
            if r["kind"] is not None:
                self._dead_letter(r["path"], r["line"], r["id"], r["kind"], r["reason"], "parse", r["value"])
                continue
            doc_id, key = r["id"], DELETE if r["op"] == "delete" else r["hash"][:16]
            want = self.winners.get(doc_id)
            if want is not None and want.removeprefix(DONE) != key:
                self.counters["superseded"] += 1
                continue
            if want is not None and want.startswith(DONE):  # the same content (or delete) again
                self.counters["unchanged" if key != DELETE else "delete_absent"] += 1
                continue
            self.winners[doc_id] = DONE + key  # (an id missing from the plan: the source changed since; apply it)
            if key == DELETE:
                self.counters["deleted" if self.store.delete(self.collection, doc_id) else "delete_absent"] += 1
            else:
                doc = Document.model_validate_json(r["doc"])
                candidates.append((Upsert(doc, r["hash"]), r["path"], r["line"]))
        if candidates:
            stored = self.store.content_hashes(self.collection, [u.doc_id for u, _, _ in candidates])
            for item in candidates:
                if stored.get(item[0].doc_id) == item[0].content_hash:
                    self.counters["unchanged"] += 1
                else:
                    self.buffer.append(item)

    # ---- the encoder pool --------------------------------------------------------------------------------------------
    def _free(self) -> list[int]:
        return [i for i, n in enumerate(self.load) if n < self.cfg.max_in_flight]

    def _dispatch(self, final: bool = False) -> None:
        """Hand full batches (at the end: what is left, split evenly) to the least busy encoders with a free slot."""
        size = self.cfg.batch_size
        while self.buffer and (free := self._free()):
            n = min(size, math.ceil(len(self.buffer) / len(self.encoders))) if final else size
            if len(self.buffer) < n:
                return
            i = min(free, key=self.load.__getitem__)
            part, self.buffer = self.buffer[:n], self.buffer[n:]
            ref = self.encoders[i].encode.remote([u.doc for u, _, _ in part])
            self.inflight[ref] = (i, time.monotonic(), part)
            self.load[i] += 1

    def _collect(self, block: bool) -> None:
        """Write every finished encode call (at least one when ``block``)."""
        if not self.inflight:
            return
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=None if block else 0)
        ready += [r for r in ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)[0]
                  if r not in ready]
        for ref in ready:
            self._write(ref)

    def _drain(self) -> None:
        while self.inflight:
            self._collect(block=True)

    def _write(self, ref) -> None:
        i, submitted, part = self.inflight.pop(ref)
        self.load[i] -= 1
        results = ray.get(ref)
        for (op, path, line), res in zip(part, results):
            value = op.doc.model_dump_json(exclude_none=True).encode()
            if isinstance(res, EncodeFailure):
                self._dead_letter(path, line, op.doc_id, "encode_failed", res.error, "encode", value)
                continue
            try:
                self.store.upsert(self.collection, op.doc, op.content_hash, res)
            except StoreRejection as err:  # refused for good: dead-letter it, keep going
                self._dead_letter(path, line, op.doc_id, "store_rejected", str(err)[:500], "store", value)
                continue
            # any other store error propagates: the run fails, and a rerun redoes what was not written
            self.counters["upserted"] += 1
            self.counters["chunks"] += len(res)
        self.batch_seconds.append(time.monotonic() - submitted)
        self.counters["batches"] += 1

    def _dead_letter(self, path, line, doc_id, kind: str, reason: str, stage: str, value: bytes) -> None:
        self.dead.add(path, line, doc_id, kind, reason, stage, value)
        self.dlq_kinds[kind] += 1

    # ---- progress and report -----------------------------------------------------------------------------------------
    def _bar(self):
        if not self.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_rows, unit="row", desc="backfill", file=sys.stderr, mininterval=0.5)

    def _postfix(self) -> str:
        c = self.counters
        elapsed = time.monotonic() - self.started
        return (f"{c['upserted']} written, {c['unchanged']} unchanged, {c['superseded']} superseded, "
                f"{sum(self.dlq_kinds.values())} dead-lettered, {c['upserted'] / elapsed if elapsed else 0:.1f} docs/s")

    def snapshot(self) -> dict:
        c, lat = self.counters, list(self.batch_seconds)
        elapsed = time.monotonic() - self.started
        return {
            "source": self.cfg.source, "format": self.fmt, "files": len(self.files), "collection": self.collection,
            "checkpoint": self.version, "records": c["records"], "upserted": c["upserted"],
            "unchanged": c["unchanged"], "superseded": c["superseded"], "deleted": c["deleted"],
            "chunks_written": c["chunks"], "dead_lettered": sum(self.dlq_kinds.values()),
            "dlq_by_kind": dict(self.dlq_kinds), "dead_letter_file": self.dead_letter_file,
            "workers": self.cfg.workers, "plan_s": self.plan_s, "elapsed_s": elapsed,
            "docs_per_s": c["upserted"] / elapsed if elapsed else 0.0,
            "batch_latency_p50_s": statistics.median(lat) if lat else None,
            "batch_latency_max_s": max(lat) if lat else None, "batches": c["batches"], "complete": self.complete,
        }
