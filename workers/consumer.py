"""Consumer actors: one Kafka consumer-group member each, feeding the encoder pool and writing to the store.

Delivery: **at-least-once, effectively once.** A partition's offset is committed only after every record below it
was (a) written to the store and acknowledged, (b) dead-lettered and acknowledged by the broker, or (c) found
unchanged. A crash anywhere before the commit redelivers the records; writes are idempotent (deterministic point
ids, content hashes), so redelivery never duplicates.

Ordering: records of one document share a partition (key = id), so one member sees them in order. Within a poll the
last operation per document wins (each replaces the whole document). Encode calls run in parallel on the pool, but
their results are written and committed strictly in poll order. Before partitions move to another member (rebalance)
everything in flight and not yet committed is dropped and the partitions it came from rewound to their committed
offsets (the records are delivered again, to whichever member owns them next). A member checks for a revocation
before each document it writes, so after a rebalance it writes at most the one document it was writing; the
rebalance callback itself makes no blocking call (kafka-python 3 runs it on its IO thread).

Backpressure: at most ``max_in_flight`` encode batches outstanding per member; when full, the member stops polling.
No wait is unbounded: an encode batch outstanding past ``encode_timeout_s`` kills the member (and it is replaced and
redelivers), a commit times out after ``COMMIT_TIMEOUT_MS``.
Re-encoding is skipped for a document whose content hash equals what the store holds (or what an in-flight batch
is about to write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from pipeline.config import IngestConfig
from pipeline.schemas import EncodeFailure
from pipeline.store import Store, StoreRejection
from workers import kafka_io
from workers.messages import Delete, PoisonMessage, Upsert, parse

log = logging.getLogger(__name__)
# longest poll while a batch is in flight (bench freshness: 20 ms polls took batch p50 502 → 319 ms)
IN_FLIGHT_POLL_MS = 20
# kafka-python 3 waits without limit on a commit or a LeaveGroup when given no timeout; during a rebalance (members
# stopping together, a node lost) that wait can outlast any drain. A commit that times out raises: the member dies
# with the batch uncommitted and it is redelivered (writes are idempotent), so a bound loses nothing.
COMMIT_TIMEOUT_MS = 30_000
LEAVE_GROUP_TIMEOUT_MS = 5_000


class EncodeTimeout(RuntimeError):
    """An encode call did not return within ``encode_timeout_s``: the member dies (uncommitted batches redelivered)."""


@dataclass
class _Batch:
    seq: int
    offsets: dict[TopicPartition, int]  # next offset to commit, per partition
    to_encode: list[tuple[Upsert, object]]  # (operation, raw record) to encode and write
    deletes: list[str]
    ref: object | None  # ObjectRef of the encode call
    started: float = field(default_factory=time.monotonic)


class _Listener(ConsumerRebalanceListener):
    """Called on kafka-python's IO thread, where a blocking consumer call raises (kafka-python 3): committing here
    killed the member in the middle of a rebalance, and a member leaving then wedged the local broker's group (no
    member was assigned again). So it only records the revocation; the run loop drops what is in flight."""

    def __init__(self, member: ConsumerMember):
        self.member = member

    def on_partitions_revoked(self, revoked):
        self.member.revoked.set()
        self.member.assigned = []

    def on_partitions_assigned(self, assigned):
        self.member.assigned = sorted(tp.partition for tp in assigned)
        self.member.last_activity = time.monotonic()
        log.info("member %d assigned %s", self.member.index, sorted(tp.partition for tp in assigned))


class ConsumerMember:
    """The consumer loop; :class:`ConsumerActor` runs it inside Ray. Plain class so its logic reads top to bottom."""

    def __init__(self, cfg: IngestConfig, index: int, encoders: list, store: Store, collection: str):
        self.cfg, self.index, self.encoders, self.store, self.collection = cfg, index, encoders, store, collection
        self.queue: deque[_Batch] = deque()
        self.pending: dict[str, tuple[int, str | None]] = {}  # doc id → (batch seq, hash it will hold; None = delete)
        self.seq = 0
        self.stop_event = threading.Event()
        self.revoked = threading.Event()  # set by a rebalance: in-flight batches are dropped, never committed
        self.counters: Counter = Counter()
        self.dlq_kinds: Counter = Counter()
        self.committed: dict[int, int] = {}
        self.batch_seconds: deque[float] = deque(maxlen=1000)
        self.assigned: list[int] = []
        self.last_activity = time.monotonic()
        self.consumer = None
        self.dlq = None

    # ---- loop ----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.consumer = kafka_io.consumer(cfg.bootstrap_servers, cfg.group_id,
                                          client_id=f"macstream-ingest-{self.index}", max_poll_records=cfg.batch_size)
        self.dlq = kafka_io.producer(cfg.bootstrap_servers)
        self.consumer.subscribe([cfg.topic], listener=_Listener(self))
        self.last_activity = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if self.revoked.is_set():
                    self._drop_in_flight("partitions revoked")
                self._finish(block=len(self.queue) >= cfg.max_in_flight)
                if len(self.queue) >= cfg.max_in_flight:
                    continue
                # while a batch is encoding, poll briefly: its write and commit wait for this poll to return, and on a
                # quiet topic a full poll_timeout_ms would add up to that much to every document's freshness
                wait = min(cfg.poll_timeout_ms, IN_FLIGHT_POLL_MS) if self.queue else cfg.poll_timeout_ms
                records = self.consumer.poll(timeout_ms=wait, max_records=cfg.batch_size)
                if records:
                    self.last_activity = time.monotonic()
                    self._submit(records)
            self.finish_all()
        finally:
            self.consumer.close(autocommit=False, timeout_ms=LEAVE_GROUP_TIMEOUT_MS)
            self.dlq.close()
        return self.stats()

    # ---- stages --------------------------------------------------------------------------------------------------
    def _submit(self, records: dict) -> None:
        ops: dict[str, tuple[Upsert | Delete, object]] = {}
        poison = []
        offsets = {}
        for tp, recs in records.items():
            for r in recs:
                self.counters["records"] += 1
                try:
                    op = parse(r.key, r.value, self.cfg.max_message_bytes)
                except PoisonMessage as err:
                    poison.append((r, err, "parse"))
                    continue
                ops.pop(op.doc_id, None)  # last operation per document wins; re-insert keeps poll order
                ops[op.doc_id] = (op, r)
            offsets[tp] = recs[-1].offset + 1
        self._dead_letter(poison)  # acknowledged by the broker before any offset past them is committed
        upserts = [(op, r) for op, r in ops.values() if isinstance(op, Upsert)]
        deletes = [op.doc_id for op, _ in ops.values() if isinstance(op, Delete)]
        fresh = [op.doc_id for op, _ in upserts if op.doc_id not in self.pending]
        stored = self.store.content_hashes(self.collection, fresh) if fresh else {}
        to_encode = []
        for op, r in upserts:
            current = self.pending[op.doc_id][1] if op.doc_id in self.pending else stored.get(op.doc_id)
            if current == op.content_hash:
                self.counters["unchanged"] += 1
            else:
                to_encode.append((op, r))
        self.seq += 1
        for op, _ in upserts:
            self.pending[op.doc_id] = (self.seq, op.content_hash)
        for d in deletes:
            self.pending[d] = (self.seq, None)
        ref = None
        if to_encode:
            encoder = self.encoders[self.seq % len(self.encoders)]
            ref = encoder.encode.remote([op.doc for op, _ in to_encode])
        self.queue.append(_Batch(self.seq, offsets, to_encode, deletes, ref))

    def _finish(self, block: bool) -> None:
        """Write, then commit, the finished batches at the head of the queue (in poll order)."""
        while self.queue:
            head = self.queue[0]
            if head.ref is not None:
                left = self.cfg.encode_timeout_s - (time.monotonic() - head.started)
                ready, _ = ray.wait([head.ref], timeout=max(0.0, left) if block else 0)
                if not ready:
                    if left > 0 and not block:
                        return
                    raise EncodeTimeout(
                        f"member {self.index}: an encode batch of {len(head.to_encode)} documents outstanding for "
                        f"{time.monotonic() - head.started:.0f} s (encode_timeout_s={self.cfg.encode_timeout_s:g}); "
                        "leaving it uncommitted for redelivery")
            results = ray.get(head.ref) if head.ref is not None else []
            failed = []
            for (op, r), res in zip(head.to_encode, results):
                if self.revoked.is_set():  # the partition may have a new owner: stop writing at once
                    self._drop_in_flight("partitions revoked")
                    return
                if isinstance(res, EncodeFailure):
                    failed.append((r, PoisonMessage("encode_failed", res.error), "encode"))
                    continue
                try:
                    self.store.upsert(self.collection, op.doc, op.content_hash, res)
                except StoreRejection as err:  # the store refuses this document for good: dead-letter it, keep flowing
                    failed.append((r, PoisonMessage("store_rejected", str(err)[:500]), "store"))
                    continue
                # any other error (store unreachable) propagates: the member dies, is replaced, and redelivers
                self.counters["upserted"] += 1
                self.counters["chunks"] += len(res)
            for d in head.deletes:
                self.counters["deleted" if self.store.delete(self.collection, d) else "delete_absent"] += 1
            self._dead_letter(failed)
            if self.revoked.is_set():  # written, not committed: redelivered, found unchanged, never re-encoded
                self._drop_in_flight("partitions revoked")
                return
            try:
                self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in head.offsets.items()},
                                     timeout_ms=COMMIT_TIMEOUT_MS)
            except KafkaError as err:  # a rebalance under way (the generation moved on), or a commit timed out
                self._drop_in_flight(f"commit failed ({type(err).__name__})")
                return
            for tp, off in head.offsets.items():
                self.committed[tp.partition] = off
            for d, (seq, _) in list(self.pending.items()):
                if seq == head.seq:
                    del self.pending[d]
            self.queue.popleft()
            self.batch_seconds.append(time.monotonic() - head.started)
            self.counters["batches"] += 1
            self.last_activity = time.monotonic()
            block = False  # only the head needed waiting for; the rest is opportunistic

    def finish_all(self) -> None:
        while self.queue:
            self._finish(block=True)

    def _drop_in_flight(self, why: str) -> None:
        """Forget every batch not committed yet and rewind each partition still held to its committed offset: those
        records are delivered again (to this member or the partition's new owner). Written-but-uncommitted documents
        come back unchanged (content hash) and are not encoded again; nothing is lost, nothing duplicated."""
        self.revoked.clear()
        if not self.queue:
            return
        self.counters["batches_dropped"] += len(self.queue)
        log.info("member %d: %s; dropping %d uncommitted batches for redelivery", self.index, why, len(self.queue))
        self.queue.clear()
        self.pending.clear()
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    def _dead_letter(self, items: list) -> None:
        if not items:
            return
        futures = []
        for r, err, stage in items:
            headers = list(r.headers or []) + [
                ("macstream.error", err.kind.encode()), ("macstream.reason", err.reason.encode("utf-8", "replace")),
                ("macstream.stage", stage.encode()), ("macstream.topic", r.topic.encode()),
                ("macstream.partition", str(r.partition).encode()), ("macstream.offset", str(r.offset).encode()),
            ]
            futures.append(self.dlq.send(kafka_io.dlq_topic(self.cfg.topic), key=r.key, value=r.value, headers=headers))
            self.dlq_kinds[err.kind] += 1
            log.warning("dead-lettered %s[%d]@%d: %s", r.topic, r.partition, r.offset, err)
        self.dlq.flush()
        for f in futures:
            f.get(timeout=30)

    def stats(self) -> dict:
        return {"index": self.index, "counters": dict(self.counters), "dlq": dict(self.dlq_kinds),
                "committed": dict(self.committed), "in_flight": len(self.queue),
                "idle_s": time.monotonic() - self.last_activity,
                "batch_seconds": list(self.batch_seconds), "assigned": list(self.assigned)}


@ray.remote(num_cpus=0, max_concurrency=4)
class ConsumerActor:
    """Runs one :class:`ConsumerMember`; ``stats``/``stop`` answer while ``run`` loops (threaded actor)."""

    def __init__(self, cfg: IngestConfig, index: int, encoders: list, store: Store, collection: str):
        logging.basicConfig(level=logging.INFO)
        self.member = ConsumerMember(cfg, index, encoders, store, collection)

    def run(self) -> dict:
        return self.member.run()

    def stats(self) -> dict:
        return self.member.stats()

    def stop(self) -> None:
        self.member.stop_event.set()
